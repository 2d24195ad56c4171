"""valid_size: a validation split held out of a one-file dataset (data/holdout.py), for every method."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.cli import main
from tunelab.config.llm import LLMParams
from tunelab.errors import ConfigError

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "alpaca.jsonl"


def _rows(path: Path, count: int) -> Path:
    """The first `count` rows of the repo's Alpaca sample, each made unique by its number."""
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()[:count]]
    for number, row in enumerate(rows):
        row["instruction"] = f"{number}. {row['instruction']}"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _prepare(tiny_llama, data: Path | list, tmp_path: Path, **settings):
    from tunelab.tasks.llm import prepare

    settings = {"trainer": "sft", "block_size": 512, "model_max_length": 512, **settings}
    data_path = data if isinstance(data, list) else str(data)  # a list: a mixture's sources
    params = LLMParams(model=str(tiny_llama), data_path=data_path, project_name=str(tmp_path / "run"), **settings)
    return prepare(params)


def _instructions(prep, rows) -> list[str]:
    """The number each row of a split was given by _rows, read back from its tokens."""
    texts = [prep.tokenizer.decode(example.input_ids) for example in rows]
    return [text.split("### Instruction:\n", 1)[1].split(".", 1)[0] for text in texts]


def test_valid_size_holds_examples_out_the_same_ones_for_the_same_seed(tiny_llama, tmp_path):
    data = _rows(tmp_path / "one.jsonl", 40)
    prep = _prepare(tiny_llama, data, tmp_path, valid_size=0.25)
    train, valid = _instructions(prep, prep.data.train), _instructions(prep, prep.data.valid)
    assert len(valid) == 10 and len(train) == 30
    assert sorted(train + valid, key=int) == [str(n) for n in range(40)]  # each example on exactly one side
    assert 0 < len(prep.valid_rows) <= 10 < len(prep.train_rows)  # rows: the examples that fit block_size
    assert train == sorted(train, key=int)  # the rest keeps its order
    assert prep.data.origins["valid"].startswith(f"10 of the 40 examples of {data}, held out")

    again = _prepare(tiny_llama, data, tmp_path, valid_size=0.25)
    assert again.prepared.hit and _instructions(again, again.data.valid) == valid  # from the cache, the same split
    fresh = _prepare(tiny_llama, data, tmp_path, valid_size=0.25, no_cache=True)
    assert _instructions(fresh, fresh.data.valid) == valid  # prepared again, the same split
    other = _prepare(tiny_llama, data, tmp_path, valid_size=0.25, seed=7)
    assert not other.prepared.hit and _instructions(other, other.data.valid) != valid
    counted = _prepare(tiny_llama, data, tmp_path, valid_size=3)
    assert not counted.prepared.hit and len(counted.data.valid) == 3 and len(counted.data.train) == 37


def test_a_run_with_valid_size_evaluates_on_the_held_out_examples(tiny_llama, tmp_path):
    data = _rows(tmp_path / "one.jsonl", 24)
    out = tmp_path / "run"
    args = ["llm", "--train", "--model", str(tiny_llama), "--data-path", str(data), "--project-name", str(out)]
    args += ["--trainer", "sft", "--valid-size", "0.25", "--epochs", "1", "--batch-size", "6", "--lr", "1e-3"]
    args += ["--gradient-accumulation", "1", "--block-size", "512", "--model-max-length", "512", "--peft"]
    args += ["--logging-steps", "1"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_loss"] > 0
    run = json.loads((out / "tunelab_run.json").read_text())
    assert run["data"]["valid"].startswith(f"6 of the 24 examples of {data}")
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(steps) == 3  # 18 training examples in batches of 6: the 6 held out are not trained on


@pytest.mark.parametrize(
    ("trainer", "row", "settings"),
    [
        (
            "dpo",
            lambda n: {"prompt": f"Question {n}?", "chosen": f"Answer {n}.", "rejected": "No."},
            {"text_column": "chosen"},
        ),
        (
            "kto",
            lambda n: {"prompt": f"Question {n}?", "completion": f"Answer {n}.", "label": n % 2 == 0},
            {"text_column": "completion", "batch_size": 2},
        ),
        ("grpo", lambda n: {"prompt": f"Question {n}?"}, {"reward_functions": "format_tag"}),
    ],
)
def test_valid_size_draws_whole_examples_for_every_kind_of_data(tiny_llama, tmp_path, trainer, row, settings):
    """A pair (dpo), a labelled answer (kto), a prompt (grpo): each is one example, held out whole."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row(n)) + "\n" for n in range(12)), encoding="utf-8")
    prep = _prepare(tiny_llama, data, tmp_path, valid_size=4, trainer=trainer, **settings)
    assert len(prep.data.train) == 8 and len(prep.data.valid) == 4 and len(prep.valid_rows) == 4


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"valid_size": 1.5}, "a whole number of its examples; got 1.5"),
        ({"valid_size": -0.1}, "valid_size must be a share"),
        ({"valid_size": 0.1, "valid_split": "valid"}, "give one of them"),
        ({"valid_size": 0.1, "streaming": True, "max_steps": 5}, "leave streaming off"),
    ],
)
def test_valid_size_values_that_cannot_work_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        LLMParams(**settings)


def test_holding_out_every_example_is_one_line_naming_the_file(tiny_llama, tmp_path, capsys):
    data = _rows(tmp_path / "few.jsonl", 5)
    args = ["llm", "--train", "--model", str(tiny_llama), "--data-path", str(data), "--trainer", "sft"]
    assert main([*args, "--project-name", str(tmp_path / "run"), "--valid-size", "5"]) == 2
    err = capsys.readouterr().err
    assert f"{data}: valid_size=5 holds out 5 of its 5 examples, leaving none to train on" in err
    assert "Traceback" not in err


def test_a_classifier_s_valid_size_is_drawn_per_label(tiny_llama, tmp_path):
    """Each label held out in proportion to its share, and none left without a training example."""
    from tunelab.config.text_classification import TextClassificationParams
    from tunelab.tasks.text_classification import prepare

    data = tmp_path / "labelled.csv"
    labels = ["good"] * 30 + ["bad"] * 8 + ["rare"] * 2
    data.write_text("text,target\n" + "".join(f"text number {n},{label}\n" for n, label in enumerate(labels)))
    params = TextClassificationParams(
        model=str(tiny_llama), data_path=str(data), project_name=str(tmp_path / "run"), valid_size=0.25
    )
    prep = prepare(params)
    assert dict(prep.data.counts["valid"]) == {"good": 7, "bad": 2, "rare": 1}
    assert dict(prep.data.counts["train"]) == {"good": 23, "bad": 6, "rare": 1}
    assert prep.data.origins["valid"].startswith(f"10 of the 40 examples of {data}")
    again = prepare(params)
    assert again.data.valid == prep.data.valid  # the same examples every time


# ---- tunelab evaluate on a valid_size run's own data: the examples it held out


def _held(examples: int, count: int, seed: int = 42) -> list[int]:
    from tunelab.data.holdout import split_indices

    return [int(i) for i in split_indices(examples, count, seed)[1]]


def test_evaluate_split_valid_on_the_run_s_own_file_measures_its_held_out_examples(
    tiny_llama, tmp_path, monkeypatch, capsys
):
    from tunelab.inference.evaluate import evaluate_run

    monkeypatch.chdir(tmp_path)  # trained with relative paths, evaluated from elsewhere with an absolute one
    data = _rows(tmp_path / "one.jsonl", 24)
    args = ["llm", "--train", "--model", str(tiny_llama), "--data-path", "one.jsonl", "--project-name", "run"]
    args += ["--trainer", "sft", "--valid-size", "0.25", "--max-steps", "2", "--batch-size", "6", "--lr", "1e-3"]
    args += ["--block-size", "512", "--model-max-length", "512", "--peft", "--eval-strategy", "no"]
    assert main(args) == 0
    out = tmp_path / "run"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    held = _held(24, 6)
    run = json.loads((out / "tunelab_run.json").read_text())

    results = evaluate_run(out, str(data), split="valid", samples=3, max_new_tokens=4)
    assert run["data"]["valid"] == "6 of the 24 examples of one.jsonl, held out by valid_size=0.25 and seed 42"
    assert results["rows"] == 6 and results["data"] == run["data"]["valid"].replace("one.jsonl", str(data))
    # The samples' prompts are held-out rows' instructions
    samples = json.loads((out / "evaluation" / "results.json").read_text())["samples"]
    asked = [sample["prompt"][-1]["content"].split(".", 1)[0] for sample in samples]
    assert len(asked) == 3 and asked == [str(i) for i in held[:3]]
    assert f"6 of the 24 examples of {data}, held out" in (out / "evaluation" / "report.md").read_text()
    # The same loss as the old path gives on a file of exactly those rows, and as mean_loss over them by hand
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    only = tmp_path / "held.jsonl"
    only.write_text("".join(json.dumps(rows[i]) + "\n" for i in held), encoding="utf-8")
    alone = evaluate_run(out, str(only), split="test", samples=0)
    assert alone["rows"] == 6 and results["eval_loss"] == pytest.approx(alone["eval_loss"], rel=1e-6)
    from tunelab.data import load_data
    from tunelab.inference.evaluate import _data_params, mean_loss
    from tunelab.inference.generate import load_run

    model, tokenizer = load_run(out)
    encoded = load_data(_data_params(out, str(data), "train"), tokenizer).train
    by_hand = mean_loss(model, [encoded.example(i, limit=512) for i in held])
    assert results["eval_loss"] == pytest.approx(by_hand, rel=1e-6)

    # --split train: the 18 it trained on; another split name, or another file: every row, as before
    trained = evaluate_run(out, str(data), split="train", samples=0)
    assert trained["rows"] == 18 and trained["data"].startswith(f"the 18 of the 24 examples of {data} trained on")
    assert evaluate_run(out, str(data), split="test", samples=0)["rows"] == 24
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(data.read_bytes())
    assert evaluate_run(out, str(copy), split="valid", samples=0)["rows"] == 24

    # The file changed since training: said in one line, nothing measured
    data.write_text("".join(data.read_text().splitlines(keepends=True)[:23]), encoding="utf-8")
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out), "--data-path", str(data), "--split", "valid"]) == 2
    err = capsys.readouterr().err
    assert "holds 23 examples now, where the run held 6 of its 24 out: the data changed since training" in err
    assert "Traceback" not in err


def test_evaluate_split_valid_on_a_dpo_run_s_own_pairs_measures_its_held_out_pairs(tiny_llama, tmp_path):
    import tunelab
    from tunelab.inference.evaluate import evaluate_run

    rows = [
        {"prompt": f"Question {n}?", "chosen": " The answer is blue.", "rejected": f" It is {n % 5} o'clock."}
        for n in range(16)
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    values = {
        "model": str(tiny_llama), "data_path": str(data), "trainer": "dpo", "project_name": str(tmp_path / "run"),
        "block_size": 64, "model_max_length": 128, "max_prompt_length": 32, "batch_size": 4, "max_steps": 2,
        "lr": 5e-3, "peft": True, "lora_r": 8, "valid_size": 4, "eval_strategy": "no",
        "disable_gradient_checkpointing": True,
    }  # fmt: skip
    out = tunelab.train(LLMParams(**values))
    held = _held(16, 4)

    results = evaluate_run(out, str(data), split="valid", samples=4, max_new_tokens=4)
    run = json.loads((out / "tunelab_run.json").read_text())
    assert results["method"] == "dpo" and results["rows"] == 4 and results["data"] == run["data"]["valid"]
    samples = json.loads((out / "evaluation" / "results.json").read_text())["samples"]
    assert [sample["prompt"] for sample in samples] == [f"Question {i}?" for i in held]
    assert [sample["rejected"] for sample in samples] == [rows[i]["rejected"].strip() for i in held]
    # The figures the old path gives on a file of exactly those pairs
    only = tmp_path / "held.jsonl"
    only.write_text("".join(json.dumps(rows[i]) + "\n" for i in held), encoding="utf-8")
    alone = evaluate_run(out, str(only), split="test", samples=0)
    assert alone["rows"] == 4
    for name in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "logps/chosen", "logps/rejected"):
        assert results[name] == pytest.approx(alone[name], abs=1e-5), name
    assert evaluate_run(out, str(data), split="train", samples=0)["rows"] == 12


def test_evaluate_split_valid_on_a_classifier_s_own_file_measures_its_held_out_texts(tiny_llama, tmp_path, capsys):
    import tunelab
    from tunelab.config.text_classification import TextClassificationParams
    from tunelab.inference.evaluate import evaluate_run

    data = tmp_path / "labelled.csv"
    labels = ["good"] * 30 + ["bad"] * 8 + ["rare"] * 2
    data.write_text("text,target\n" + "".join(f"text number {n},{label}\n" for n, label in enumerate(labels)))
    params = TextClassificationParams(
        model=str(tiny_llama), data_path=str(data), project_name=str(tmp_path / "run"), valid_size=0.25,
        max_steps=2, batch_size=8, max_seq_length=16,
    )  # fmt: skip
    out = tunelab.train(params)

    results = evaluate_run(out, str(data), split="valid")
    run = json.loads((out / "tunelab_run.json").read_text())
    assert results["rows"] == 10 and results["data"] == run["data"]["valid"]
    assert {label: row["support"] for label, row in results["per_class"].items()} == {"bad": 2, "good": 7, "rare": 1}
    # the run's own final evaluation was on those texts: the same predictions
    final = json.loads((out / "eval_report.json").read_text())["final"]
    assert results["confusion_matrix"] == final["confusion_matrix"]
    assert evaluate_run(out, str(data), split="train")["rows"] == 30

    # the same number of rows with other labels: the held-out texts cannot be found again
    changed = ["good"] * 29 + ["bad"] * 9 + ["rare"] * 2
    data.write_text("text,target\n" + "".join(f"text number {n},{label}\n" for n, label in enumerate(changed)))
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out), "--data-path", str(data), "--split", "valid"]) == 2
    assert "the data changed since training" in capsys.readouterr().err


# ---- what review found: repeated examples, shared prompts, labels with one example, a relative template


def test_a_weighted_mixture_source_never_trains_on_what_it_held_out(tiny_llama, tmp_path):
    """A weight repeats a source's examples: they are held out per source before the draw, so no copy of a held-out
    example is trained on."""
    first, second = _rows(tmp_path / "a.jsonl", 10), tmp_path / "b.jsonl"
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()[10:20]]
    for number, row in enumerate(rows, start=10):
        row["instruction"] = f"{number}. {row['instruction']}"
    second.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    mixture = [{"path": str(first), "weight": 3}, {"path": str(second)}]
    prep = _prepare(tiny_llama, mixture, tmp_path, valid_size=0.3)
    train, valid = _instructions(prep, prep.data.train), _instructions(prep, prep.data.valid)
    assert len(valid) == 6 and not set(valid) & set(train)  # 3 of each source
    assert len(train) == 3 * 7 + 7  # the first source's kept examples, three times each


def test_kto_answers_to_one_prompt_are_held_out_together(tiny_llama, tmp_path):
    rows = [{"prompt": f"Q{n}?", "chosen": f"Yes {n}.", "rejected": f"No {n}."} for n in range(12)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    prep = _prepare(tiny_llama, data, tmp_path, trainer="kto", text_column="chosen", batch_size=2, valid_size=0.25)
    prompts = [{tuple(item.prompt_ids) for item in side} for side in (prep.data.train, prep.data.valid)]
    assert len(prep.data.valid) == 6 and len(prompts[1]) == 3 and not prompts[0] & prompts[1]


def test_a_classifier_s_labels_of_one_example_stay_to_be_trained_on(tiny_llama, tmp_path):
    from tunelab.config.text_classification import TextClassificationParams
    from tunelab.errors import DataError
    from tunelab.tasks.text_classification import prepare

    def held(labels, **extra):
        data = tmp_path / "labelled.csv"
        data.write_text("text,target\n" + "".join(f"text number {n},{label}\n" for n, label in enumerate(labels)))
        params = TextClassificationParams(
            model=str(tiny_llama), data_path=str(data), project_name=str(tmp_path / "run"), **extra
        )
        return dict(prepare(params).data.counts["valid"])

    assert held(["lone"] + ["many"] * 100, valid_size=10) == {"many": 10}  # the full 10, none from "lone"
    with pytest.raises(DataError, match="no label has two examples"):
        held(["a", "b"], valid_size=1)


def test_evaluate_reads_a_run_trained_with_a_relative_template_file_from_anywhere(tiny_llama, tmp_path, monkeypatch):
    """The run's tokenizer carries the template it trained with: evaluate uses it, not the saved path (relative to
    where training ran, perhaps edited since)."""
    import tunelab
    from tunelab.inference.evaluate import evaluate_run

    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    Path("mine.jinja").write_text(
        "{% for m in messages %}{{ '[' + m['role'] + '] ' + m['content'] }}{% if m['role'] == 'assistant' %}"
        "{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}"
    )
    data = _rows(tmp_path / "one.jsonl", 12)
    out = tunelab.train(
        model=str(tiny_llama), data_path=str(data), trainer="sft", chat_template="mine.jinja", max_steps=1,
        batch_size=2, block_size=512, model_max_length=512, project_name=str(tmp_path / "run"),
    )  # fmt: skip
    Path("mine.jinja").write_text("{{ 'edited since' }}")
    monkeypatch.chdir(tmp_path)
    results = evaluate_run(out, str(data), split="test", samples=1, max_new_tokens=2)
    assert results["rows"] == 12 and results["eval_loss"] > 0


def test_grouped_hold_outs_never_grow_far_past_what_was_asked():
    """A prompt with many answers is held out whole only where it fits: the split stays the size asked for."""
    from tunelab.data.holdout import split_indices

    groups = ["big"] * 30 + [f"q{n}" for n in range(19)]
    for seed in range(50):
        kept, held = split_indices(len(groups), 5, seed, groups)
        assert len(held) == 5 and len(kept) == 44 and not {groups[i] for i in held} & {groups[i] for i in kept}
    kept, held = split_indices(4, 1, 0, ["a", "a", "b", "b"])  # nothing fits: the smallest group, one stays
    assert len(held) == 2 and len(kept) == 2


def test_a_mixture_holds_out_the_count_asked_for_in_all(tiny_llama, tmp_path):
    first = _rows(tmp_path / "a.jsonl", 40)
    second = tmp_path / "b.jsonl"
    second.write_text("".join(first.read_text().splitlines(keepends=True)[:8]).replace(". ", "b. "))
    prep = _prepare(tiny_llama, [{"path": str(first)}, {"path": str(second)}], tmp_path, valid_size=5)
    assert len(prep.data.valid) == 5 and len(prep.data.train) == 43  # 4 of the first source, 1 of the second


def test_early_stopping_takes_a_mixture_whose_sources_bring_their_validation_splits():
    sources = [{"path": "a/", "valid_split": "valid"}, {"path": "b/"}]
    assert LLMParams(data_path=sources, early_stopping_patience=2).early_stopping_patience == 2


def test_a_mixture_count_never_takes_a_small_source_s_last_example():
    from tunelab.data import _valid_sizes

    assert _valid_sizes(2, [1, 3]) == [0.0, 2.0]  # the one-example source keeps it
    assert _valid_sizes(5, [40, 8]) == [4.0, 1.0] and _valid_sizes(0.1, [3, 4]) == [0.1, 0.1]
