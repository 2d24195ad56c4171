"""After training, on a tiny LoRA run: evaluate (report, curves, base comparison), merge, chat; and the clear
errors every after-training command gives for a missing or wrong model folder."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab.cli import main
from tunelab.errors import TunelabError
from tunelab.inference.chat import ChatSession, chat_loop
from tunelab.inference.evaluate import evaluate_run
from tunelab.inference.generate import GenerationParams, load_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lora_run(tiny_llama, tmp_path_factory) -> Path:
    """A short LoRA SFT run with a valid split evaluated along the way (both loss curves exist)."""
    folder = tmp_path_factory.mktemp("after")
    lines = (ROOT / "samples" / "alpaca.jsonl").read_text(encoding="utf-8").splitlines()
    (folder / "data").mkdir()
    (folder / "data" / "train.jsonl").write_text("\n".join(lines[:120]) + "\n", encoding="utf-8")
    (folder / "data" / "test.jsonl").write_text("\n".join(lines[120:150]) + "\n", encoding="utf-8")
    project = folder / "run"
    code = main(
        [
            "llm", "--train", "--model", str(tiny_llama), "--data-path", str(folder / "data"),
            "--valid-split", "test", "--eval-strategy", "steps", "--logging-steps", "5",
            "--trainer", "sft", "--peft", "--lora-r", "8", "--lr", "3e-3", "--epochs", "1",
            "--batch-size", "4", "--gradient-accumulation", "1", "--block-size", "192", "--model-max-length", "256",
            "--project-name", str(project), "--disable-gradient-checkpointing",
        ]
    )  # fmt: skip
    assert code == 0
    return project


def test_evaluate_writes_report_curves_and_beats_the_base(lora_run, capsys):
    data = lora_run.parent / "data"
    code = main(["evaluate", "--model", str(lora_run), "--data-path", str(data), "--compare-base", "--samples", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    results = json.loads((lora_run / "evaluation" / "results.json").read_text())
    assert 20 <= results["rows"] <= 30  # rows whose answer lies beyond block_size have nothing to score
    assert results["eval_loss"] < results["base_eval_loss"], results
    assert results["eval_perplexity"] == pytest.approx(2.718281828 ** results["eval_loss"], rel=1e-6)
    assert len(results["samples"]) == 2 and all(s["base"] is not None for s in results["samples"])
    report = (lora_run / "evaluation" / "report.md").read_text()
    assert "| fine-tuned |" in report and "| base (" in report and "loss_curves.png" in report
    with Image.open(lora_run / "evaluation" / "loss_curves.png") as image:
        assert image.size == (720, 420)
        colours = {colour for _, colour in image.getcolors(maxcolors=100_000)}
        assert (31, 119, 180) in colours and (214, 39, 40) in colours  # the train and the eval curve are drawn
    card = (lora_run / "README.md").read_text()
    assert card.count("## Evaluation") == 1 and "evaluation/report.md" in card
    # Evaluating again replaces the report and the card's section instead of adding a second one.
    evaluate_run(lora_run, str(data), samples=1)
    assert (lora_run / "README.md").read_text().count("## Evaluation") == 1
    assert not (lora_run / ".evaluation.partial").exists()


def test_evaluate_a_run_on_its_own_training_data_without_a_base(lora_run):
    results = evaluate_run(lora_run, str(lora_run.parent / "data"), split="train", max_rows=20, samples=0)
    assert 10 <= results["rows"] <= 20 and "base_eval_loss" not in results


def test_merge_gives_a_plain_model_with_the_adapter_s_outputs(lora_run, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(lora_run), "--output", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template  # the training template travels with it
    adapted, _ = load_run(lora_run)
    ids = tokenizer("Write a short poem about the sea.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-4, atol=1e-4)
    assert merged.dtype == torch.float32  # the tiny base model's own dtype

    assert main(["merge", "--model", str(lora_run), "--output", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["merge", "--model", str(out), "--output", str(tmp_path / "again")]) == 2
    assert "no LoRA adapter to merge" in capsys.readouterr().err


def test_chat_streams_keeps_history_and_resets(lora_run):
    model, tokenizer = load_run(lora_run)
    session = ChatSession(model, tokenizer, GenerationParams(max_new_tokens=12))
    pieces: list[str] = []
    answer = session.send("Give me a tip for studying.", pieces.append)
    assert len(pieces) > 1 and "".join(pieces).strip() == answer  # streamed, not printed at the end
    session.send("And another one?")
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
    prompt = session.prompt_text()  # the run's template (Alpaca here: it was trained on Alpaca rows)
    assert prompt.index("Give me a tip for studying.") < prompt.index("And another one?")
    session.reset()
    assert session.history == []

    lines = iter(["Hello there", "/reset", "/what", "", "/exit", "never read"])
    out = io.StringIO()
    chat_loop(ChatSession(model, tokenizer, GenerationParams(max_new_tokens=4)), read=lambda _: next(lines), out=out)
    text = out.getvalue()
    assert "assistant> " in text and "(conversation cleared)" in text and "unknown command /what" in text
    assert next(lines) == "never read"  # /exit stopped the loop


def test_chat_keeps_the_conversation_when_generating_fails_and_fits_long_histories(tiny_llama):
    model, tokenizer = load_run(tiny_llama)  # context 512
    broken = ChatSession(model, tokenizer, GenerationParams(max_new_tokens=4, do_sample=True, top_k=-1))
    with pytest.raises(ValueError, match="top_k"):  # raised in the generating thread, handed back: no hang
        broken.send("Hello")
    assert broken.history == []

    session = ChatSession(model, tokenizer, GenerationParams(max_new_tokens=8))
    long = "word " * 150  # about 150 tokens a turn: six exchanges are far past the context
    session.history = [{"role": r, "content": long} for _ in range(6) for r in ("user", "assistant")]
    session.send("Hello")  # the oldest exchanges are left out of the prompt, not the conversation
    assert len(session.history) == 14 and session.history[-2]["content"] == "Hello"
    with pytest.raises(TunelabError, match="context is 512 tokens"):
        session.send("word " * 600)
    assert len(session.history) == 14


def test_chat_refuses_a_system_message_the_template_cannot_take(tiny_llama, tmp_path):
    model, tokenizer = load_run(tiny_llama)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(TunelabError, match="takes no system message"):
        ChatSession(model, tokenizer, system="Be brief.")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--do-sample", "--temperature", "0"], "--temperature must be above 0"),
        (["--top-p", "1.5"], "--top-p must be above 0 and at most 1"),
        (["--num-return-sequences", "3"], "needs --do-sample"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    ],
)
def test_generate_options_transformers_would_refuse_are_one_line(flags, message, tmp_path, capsys):
    missing = tmp_path / "not-even-loaded"
    code = main(["generate", "--model", str(missing), *flags, "Hello"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize(
    "command",
    [
        ["evaluate", "--data-path", "x.jsonl"],
        ["chat"],
        ["merge", "--output", "out"],
        ["export", "--output", "out.gguf"],
    ],
)
def test_commands_name_a_missing_or_empty_model_folder(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "no-such-run"
    missing.mkdir() if command[0] == "chat" else None  # chat takes hub ids too: give it an empty folder
    code = main([command[0], "--model", str(missing), *command[1:]])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert str(missing) in err and ("does not exist" in err or "holds no model" in err), err
    (tmp_path / ".empty.partial").mkdir()
    (tmp_path / "empty").mkdir()
    assert main([command[0], "--model", str(tmp_path / "empty"), *command[1:]]) == 2
    err = capsys.readouterr().err
    assert "holds no model" in err and "unfinished run" in err


def test_export_of_a_lora_run_merges_first_and_predicts_the_same(lora_run, tmp_path, capsys):
    out = tmp_path / "gguf" / "run.gguf"
    assert main(["export", "--model", str(lora_run), "--format", "gguf", "--output", str(out), "--dtype", "f32"]) == 0
    assert "exported" in capsys.readouterr().out
    exported = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name).eval()
    adapted, tokenizer = load_run(lora_run)
    ids = tokenizer("Write a short poem about the sea.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected, got = adapted(ids).logits, exported(ids).logits
    assert torch.equal(expected.argmax(-1), got.argmax(-1))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
