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
from tunelab.errors import ConfigError, TunelabError
from tunelab.inference.chat import ChatSession, StreamedAnswer, chat_loop
from tunelab.inference.device import inference_device
from tunelab.inference.evaluate import evaluate_run
from tunelab.inference.generate import GenerationParams, Prompting, load_run

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
            "--project-name", str(project), "--disable-gradient-checkpointing", "--bad-rows", "skip",
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


def test_evaluate_skips_bad_rows_as_the_run_did(lora_run, tmp_path):
    """The run was trained with bad_rows: skip: the evaluation split's bad rows are skipped for the sample answers
    as they are for the loss, and the report is written."""
    lines = (ROOT / "samples" / "alpaca.jsonl").read_text(encoding="utf-8").splitlines()[120:130]
    (tmp_path / "test.jsonl").write_text(
        json.dumps({"instruction": "An instruction without its output"}) + "\n" + "\n".join(lines) + "\n"
    )
    results = evaluate_run(lora_run, str(tmp_path), samples=2)
    written = json.loads((lora_run / "evaluation" / "results.json").read_text())
    assert written["data"] == results["data"] and results["rows"] >= 5
    prompts = [sample["prompt"][0]["content"] for sample in written["samples"]]
    assert prompts == [json.loads(line)["instruction"] for line in lines[:2]]


def test_evaluate_answers_end_where_the_template_ends_a_turn(tmp_path_factory, tiny_llama):
    """A run taught one answer closed by a text turn end ("[END]", several tokens): evaluate's sample answer stops
    there, as generate's does, instead of running on into an invented next turn until max_new_tokens."""
    from tests.test_turn_end import ANSWER, TEXT_MARKER, _taught_run
    from tunelab.inference.generate import generate

    run = _taught_run(tiny_llama, tmp_path_factory.mktemp("evaluate-turn-end"), TEXT_MARKER)
    data = run.parent / "eval"
    data.mkdir()
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ANSWER}]
    (data / "test.jsonl").write_text(json.dumps({"messages": chat}) + "\n")
    evaluate_run(run, str(data), samples=1, max_new_tokens=40)
    sample = json.loads((run / "evaluation" / "results.json").read_text())["samples"][0]
    model, tokenizer = load_run(run)
    assert sample["tuned"] == ANSWER == generate(model, tokenizer, "Hi")[0]

    # A report that cannot be written (here a file stands where its staging folder goes: the tests run as root,
    # for whom no folder is read-only) is one line naming the run folder.
    (run / ".evaluation.partial").write_text("in the way")
    with pytest.raises(TunelabError, match=f"evaluate: cannot write the report into {run}"):
        evaluate_run(run, str(data), samples=0)


def test_loaded_models_run_on_the_inference_device(tiny_llama):
    assert inference_device() == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_run(tiny_llama)
    assert {p.device for p in model.parameters()} == {inference_device()} and not model.training


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_generate_evaluate_and_merge_inputs_run_on_the_gpu(lora_run):
    from tunelab.inference.generate import generate

    model, tokenizer = load_run(lora_run)
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert isinstance(generate(model, tokenizer, "Hello", GenerationParams(max_new_tokens=4))[0], str)
    results = evaluate_run(lora_run, str(lora_run.parent / "data"), max_rows=4, samples=1, compare_base=True)
    assert results["eval_loss"] > 0 and results["samples"][0]["base"] is not None


def _bf16_run_with_small_updates(folder: Path, tokenizer) -> Path:
    """A bfloat16 base and a LoRA adapter whose updates are mostly below half a bfloat16 rounding step of the
    weights they change (a low learning rate's few steps look like this)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.3, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder / "base")
    tokenizer.save_pretrained(folder / "base")
    base = AutoModelForCausalLM.from_pretrained(folder / "base", dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    adapted = get_peft_model(base, lora)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.normal_(std=2e-3)
    adapted.save_pretrained(folder / "run")
    tokenizer.save_pretrained(folder / "run")
    return folder / "run"


def test_merge_in_float32_keeps_small_lora_updates_that_bfloat16_rounds_away(tiny_tokenizer, tmp_path):
    from peft import PeftModel

    from tunelab.inference.export import export_run
    from tunelab.inference.merge import merge_run

    run = _bf16_run_with_small_updates(tmp_path, tiny_tokenizer)
    ids = tiny_tokenizer("Write a short poem about the sea.", return_tensors="pt")["input_ids"]

    def logits(model) -> torch.Tensor:
        with torch.no_grad():
            return model.eval()(ids).logits.float()

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    expected = logits(PeftModel.from_pretrained(base, run))  # the adapter on the base, unmerged, in float32
    unadapted = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    effect = (logits(unadapted) - expected).abs().max()
    # The old way: merged in the base's bfloat16, then read in float32.
    bf16_base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16)
    old_error = (logits(PeftModel.from_pretrained(bf16_base, run).merge_and_unload().float()) - expected).abs().max()

    merged = AutoModelForCausalLM.from_pretrained(merge_run(run, tmp_path / "merged-f32", "float32"))
    new_error = (logits(merged) - expected).abs().max()
    print(f"adapter effect {effect:.2e}; bf16 merge error {old_error:.2e}; f32 merge error {new_error:.2e}")
    assert old_error > 0.3 * effect  # bfloat16 loses much of the update...
    assert new_error < 1e-3 * effect  # ...float32 keeps it
    default = AutoModelForCausalLM.from_pretrained(merge_run(run, tmp_path / "merged"))
    assert default.dtype == torch.bfloat16  # saved in the base's own dtype, as before

    # An f32 GGUF export of the unmerged run carries the float32 merge, not a rounded one.
    out = export_run(run, tmp_path / "gguf" / "run.gguf", "f32")
    exported = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name)
    assert (logits(exported) - expected).abs().max() < 1e-3 * effect


def test_merge_into_the_base_s_dtype_gives_the_float32_merge_s_bits_without_its_copy(tiny_tokenizer, tmp_path):
    """merge_run merges into a bfloat16 base in place (no float32 copy of the model); each weight must still be
    the float32 sum of weight and update, rounded once, bit for bit."""
    from peft import PeftModel

    from tunelab.inference.merge import merge_run

    run = _bf16_run_with_small_updates(tmp_path, tiny_tokenizer)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    expected = PeftModel.from_pretrained(base, run).merge_and_unload().to(torch.bfloat16).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(merge_run(run, tmp_path / "merged")).state_dict()
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "base").state_dict()
    assert merged.keys() == expected.keys()
    changed = 0
    for name, weight in merged.items():
        assert weight.dtype == torch.bfloat16 and torch.equal(weight, expected[name]), name
        changed += not torch.equal(weight, original[name])
    assert changed == 8  # q, v, up and down of both layers: the adapter was merged


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
    (tmp_path / "a-file").write_text("")  # an output that cannot be written: one line naming it
    assert main(["merge", "--model", str(lora_run), "--output", str(tmp_path / "a-file" / "merged")]) == 2
    err = capsys.readouterr().err
    assert f"merge: cannot write {tmp_path / 'a-file' / 'merged'}" in err and "Traceback" not in err


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


def test_chat_shows_a_reasoning_model_s_thinking_apart_and_keeps_it_in_the_conversation(reasoner, capsys):
    """The reasoning streams after `thinking>`, the answer after `assistant>`, never the <think> markers; the
    conversation keeps the reasoning apart, and the template writes it back as it was trained (chatml folds it)."""
    model, tokenizer = load_run(reasoner)
    session = ChatSession(model, tokenizer, GenerationParams(max_new_tokens=32))
    answer = session.send("What is 2+2?")
    assert answer == "<think>\nTwo and two make four.\n</think>\n\n4"  # as written, for the app to fold
    assert session.history[-1] == {"role": "assistant", "content": "4", "reasoning_content": "Two and two make four."}
    turn = "<|im_start|>assistant\n<think>\nTwo and two make four.\n</think>\n\n4<|im_end|>"
    assert turn in session.prompt_text()

    def shown(session: ChatSession, show_reasoning: bool = True) -> str:
        lines, out = iter(["What is 2+2?", "/exit"]), io.StringIO()
        chat_loop(session, read=lambda _: next(lines), out=out, show_reasoning=show_reasoning)
        return out.getvalue().split("\n", 1)[1]  # after the greeting line

    def fresh(max_new_tokens: int = 32, **options) -> ChatSession:
        return ChatSession(model, tokenizer, GenerationParams(max_new_tokens=max_new_tokens), **options)

    assert shown(fresh()) == "thinking> Two and two make four.\nassistant> 4\n"
    assert shown(fresh(), show_reasoning=False) == "thinking> ...\nassistant> 4\n"
    assert shown(fresh(thinking=None)) == "assistant> <think>\nTwo and two make four.\n</think>\n\n4\n"
    begun = len(tokenizer("<think>\nTwo and", add_special_tokens=False)["input_ids"])
    cut = shown(fresh(max_new_tokens=begun))
    assert cut.startswith("thinking> Two and") and "assistant>" not in cut and "cut off while thinking" in cut
    opened = len(tokenizer("<think>\n", add_special_tokens=False)["input_ids"])  # nothing after the open marker
    nothing = shown(fresh(max_new_tokens=opened))
    assert nothing == "thinking> (the answer was cut off while thinking: raise --max-new-tokens)\n"

    # How a whole answer is read: cut off on a partial close marker, a block closed with nothing after it, and a
    # template that opened the block itself (the answer begins inside it).
    session = fresh()
    assert session.parts("<think>\nStill thinking\n</th") == ("Still thinking", None)
    assert session.parts("<think>\nDone.\n</think>\n\n") == ("Done.", "")
    assert session.parts("<think>\n") == (None, None) and session.parts("") == (None, "")
    session.opened = "<think>"
    assert session.parts("Two and two.\n</think>\n\n4") == ("Two and two.", "4")
    out = io.StringIO()
    answer = StreamedAnswer(fresh(), out, show_reasoning=True)
    answer.end("<think>\nDone.\n</think>\n\n")
    assert out.getvalue() == "thinking> Done.\nassistant> "  # no answer, and not said to be cut off
    stopped, out = fresh(), io.StringIO()
    StreamedAnswer(stopped, out, show_reasoning=True).end("<think>\nHmm")  # the model ended its turn there
    assert out.getvalue() == "thinking> Hmm\n(the model stopped while thinking, without an answer)"

    # A message that leaves the answer a few tokens of the context (512): cut off while thinking, and said why.
    session, words = fresh(max_new_tokens=64), 1

    def room(words: int) -> int:
        return 512 - len(tokenizer(session.prompt_text([{"role": "user", "content": "2+2? " * words}]))["input_ids"])

    while room(words) > begun:
        words += 1
    out = io.StringIO()
    answer = StreamedAnswer(session, out, show_reasoning=True)
    answer.end(session.send("2+2? " * words, answer.add))
    assert out.getvalue().startswith("thinking> ") and out.getvalue().endswith("little of the context)")

    assert main(["chat", "--model", str(reasoner), "--chat-template-kwargs", "{not json"]) == 2
    assert "chat_template_kwargs: not a JSON object" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="never reads enable_thinking"):  # as training refuses it
        fresh(template_kwargs={"enable_thinking": False})
    with pytest.raises(ConfigError, match="add_generation_prompt is not a template variable"):
        fresh(template_kwargs={"add_generation_prompt": False})


def test_generate_reads_a_reasoning_model_s_thinking_apart(reasoner, tmp_path, capsys):
    """`tunelab generate`: the answer on stdout, its reasoning on stderr after `thinking>`; with --data-path, the
    answer and its reasoning in their own fields, a held-out chat's reference read apart the same way; as written
    with --reasoning-parser none."""
    run = ["generate", "--model", str(reasoner), "--max-new-tokens", "32"]
    assert main([*run, "What is 2+2?"]) == 0
    out, err = capsys.readouterr()
    assert out == "4\n" and "thinking> Two and two make four.\n" in err
    assert main([*run, "--hide-reasoning", "What is 2+2?"]) == 0
    out, err = capsys.readouterr()
    assert out == "4\n" and "thinking>" not in err
    assert main([*run, "--reasoning-parser", "none", "What is 2+2?"]) == 0
    assert capsys.readouterr().out == "<think>\nTwo and two make four.\n</think>\n\n4\n"
    begun = load_run(reasoner)[1]("<think>\nTwo and", add_special_tokens=False)["input_ids"]
    assert main([*run[:-1], str(len(begun)), "What is 2+2?"]) == 0  # cut off inside its reasoning
    out, err = capsys.readouterr()
    assert out == "\n" and "thinking> Two and\n" in err and "cut off while thinking: raise --max-new-tokens" in err

    held_out = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "Four.", "reasoning_content": "Add them."},
    ]
    plain = [held_out[0], {"role": "assistant", "content": "Four."}]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in (held_out, "What is 2+2?", plain)))
    answers = tmp_path / "answers.jsonl"
    files = ["--data-path", str(data), "--text-column", "messages", "--output", str(answers)]
    assert main([*run, *files]) == 0
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert rows[0] == {
        "prompt": held_out[:1],
        "answer": "4",
        "reasoning": "Two and two make four.",
        "finish_reason": "stop",
        "reference": "Four.",
        "reference_reasoning": "Add them.",
    }
    answered = {"answer": "4", "reasoning": "Two and two make four.", "finish_reason": "stop"}
    assert rows[1] == {"prompt": "What is 2+2?", **answered}
    assert rows[2]["reference"] == "Four." and "reference_reasoning" not in rows[2]
    assert main([*run, *files, "--reasoning-parser", "deepseek_r1"]) == 0  # answers begin inside; references not
    assert [json.loads(line) for line in answers.read_text().splitlines()] == rows
    assert main([*run, *files, "--reasoning-parser", "none"]) == 0
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert rows[0]["answer"] == "<think>\nTwo and two make four.\n</think>\n\n4" and "reasoning" not in rows[0]
    assert rows[0]["reference"] == "<think>\nAdd them.\n</think>\n\nFour."
    several = ["--do-sample", "--num-return-sequences", "2", "--temperature", "0.01"]
    assert main([*run, *files, *several]) == 0
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert rows[1]["answers"] == ["4", "4"] and rows[1]["reasonings"] == ["Two and two make four."] * 2
    assert rows[1]["finish_reasons"] == ["stop", "stop"]
    assert main([*run[:-1], str(len(begun)), *files]) == 0  # cut off inside its reasoning
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert rows[1] == {"prompt": "What is 2+2?", "answer": "", "reasoning": "Two and", "finish_reason": "length"}

    from tunelab.cli import print_answer
    from tunelab.inference.generate import Answer

    capsys.readouterr()
    print_answer(Answer("Hmm", None, "stop"), show_reasoning=True)  # the model ended its turn while thinking
    out, err = capsys.readouterr()
    assert out == "\n" and err == "thinking> Hmm\n(the model stopped while thinking, without an answer)\n"

    assert main([*run, "--chat-template-kwargs", "{not json", "Hi"]) == 2
    assert "chat_template_kwargs: not a JSON object" in capsys.readouterr().err
    assert main([*run, "--chat-template-kwargs", '{"enable_thinking": false}', "Hi"]) == 2
    assert "never reads enable_thinking" in capsys.readouterr().err


def test_generate_reads_an_answer_begun_by_the_template_and_keeps_special_think_markers(reasoner):
    """A template whose generation prompt opens the think block (DeepSeek-R1's): the answer begins inside it. A
    tokenizer that marks <think> special: decoding keeps it (as serve does), where plain decoding would drop it."""
    from tunelab.inference.generate import generate_many
    from tunelab.inference.reasoning import THINK
    from tunelab.inference.streaming import keeping

    model, tokenizer = load_run(reasoner)
    tokenizer.chat_template += "{% if add_generation_prompt %}<think>\n{% endif %}"
    (answer,) = next(generate_many(model, tokenizer, ["What is 2+2?"], GenerationParams(max_new_tokens=32), 1, THINK))
    assert (answer.reasoning, answer.text) == ("Two and two make four.", "4")

    assert keeping(tokenizer, THINK.markers) is tokenizer  # nothing special to keep: decoded as always
    tokenizer.add_tokens(list(THINK.markers), special_tokens=True)
    ids = tokenizer("<think>\nHmm.\n</think>\n\n4", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "\nHmm.\n\n\n4"
    assert keeping(tokenizer, THINK.markers).decode(ids, skip_special_tokens=True) == "<think>\nHmm.\n</think>\n\n4"


def test_an_answer_ends_for_a_reason():
    """ "length" only for a sequence that used its whole budget without an end token or a stop string."""
    from tunelab.inference.generate import finish_reason

    end = [2, 7]
    assert finish_reason([5, 6, 8, 9], end, 4, at_stop_string=False) == "length"
    assert finish_reason([5, 7, 2, 2], end, 4, at_stop_string=False) == "stop"  # ended, padded beside a longer row
    assert finish_reason([5, 6, 8, 9], end, 4, at_stop_string=True) == "stop"  # a turn end of several tokens
    assert finish_reason([5, 2], end, 4, at_stop_string=False) == "stop"


def test_generate_answers_many_prompts_with_a_tokenizer_that_has_no_pad_token(tiny_llama):
    from tunelab.inference.generate import generate_many

    model, tokenizer = load_run(tiny_llama)
    prompts, options = ["Hi", "Hello there, how are you today?"], GenerationParams(max_new_tokens=4)
    padded = [a[0].text for a in generate_many(model, tokenizer, prompts, options, batch_size=2)]
    tokenizer.pad_token = None  # as load_tokenizer leaves a base with no pad, EOS or UNK token: no left-padding
    assert tokenizer.pad_token_id is None
    assert [a[0].text for a in generate_many(model, tokenizer, prompts, options, batch_size=2)] == padded


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
    with pytest.raises(TunelabError, match="generate: this model's chat template takes no system message"):
        Prompting("Be brief.").check(tokenizer)


def test_generate_opens_each_prompt_with_a_system_message_and_samples_from_a_seed(reasoner, tiny_llama, capsys):
    """--system opens a text prompt and a conversation that has no system turn of its own (one that has keeps
    its own); a model with no template cannot take one. --seed: the same samples each run."""
    from tunelab.inference.generate import format_prompt

    _, tokenizer = load_run(reasoner)
    prompting = Prompting("Be brief.").check(tokenizer)
    system = "<|im_start|>system\nBe brief.<|im_end|>\n"
    assert format_prompt("2+2?", tokenizer, prompting).startswith(system + "<|im_start|>user\n2+2?")
    own = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "2+2?"}]
    assert format_prompt(own, tokenizer, prompting) == format_prompt(own, tokenizer)
    assert "Be brief." in format_prompt([own[1]], tokenizer, prompting)
    plain = AutoTokenizer.from_pretrained(tiny_llama)
    plain.chat_template = None
    with pytest.raises(TunelabError, match="--system needs a chat template"):
        Prompting("Be brief.").check(plain)

    sample = ["generate", "--model", str(tiny_llama), "--max-new-tokens", "8", "--do-sample", "Hello"]
    assert main([*sample, "--seed", "-1"]) == 2 and "--seed must be 0 or more" in capsys.readouterr().err
    answers = []
    for seed in ("1", "1", "2", "3"):
        assert main([*sample, "--seed", seed]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] and len(set(answers)) > 1  # a random model's samples differ from seed to seed


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
    from gguf import GGUFReader

    assert GGUFReader(out).fields["general.name"].contents() == lora_run.name  # not the temporary merge's folder


def test_predictions_to_a_folder_are_one_line(tiny_tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from tunelab.inference.predict import load_classifier, predictions_path, write_predictions

    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, num_labels=2, id2label={0: "no", 1: "yes"},
        label2id={"no": 0, "yes": 1}, pad_token_id=tiny_tokenizer.eos_token_id,
    )  # fmt: skip
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "classifier")
    tiny_tokenizer.save_pretrained(tmp_path / "classifier")
    model, tokenizer = load_classifier(tmp_path / "classifier")
    assert {p.device for p in model.parameters()} == {inference_device()}
    data = tmp_path / "texts.csv"
    data.write_text("text\nhello there\nnot this one\n")
    (tmp_path / "out").mkdir()
    with pytest.raises(TunelabError, match=f"predict: --output {tmp_path / 'out'} is a folder"):
        predictions_path(data, str(tmp_path / "out"))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(TunelabError, match="predict: cannot write"):
        predictions_path(data, str(tmp_path / "a-file" / "out.csv"))
    target = predictions_path(data, None)
    written = write_predictions(model, tokenizer, ["hello there", "not this one"], "text", target)
    assert written.read_text().startswith("text,label,score,p_no")
