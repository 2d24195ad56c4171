"""kto: thumbs-up/down data (and preference pairs, unpaired) -> labeled answers; bad input named before training;
a tiny model trains; the default model trains on thumbs data built from the shared preference pairs, and a SimPO
run beside it (slow). The loss against TRL's KTOTrainer is in tests/test_preference.py."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pytest

import tunelab
from tests.conftest import SHARED_DATA, needs_shared, read_metrics, train_losses
from tests.test_bad_input import assert_nothing_written, error_line
from tunelab.cli import main
from tunelab.data.kto import load_kto_data
from tunelab.data.preference import split_common_prefix
from tunelab.errors import DataError

THUMBS = [
    {"prompt": "Name a colour.", "completion": "Blue.", "label": True},
    {"prompt": "Name a colour.", "completion": "I will not.", "label": False},
    {"prompt": "What is 2 + 2?", "completion": "4", "label": "true"},
    {"prompt": "What is 2 + 2?", "completion": "5", "label": 0},
    {"prompt": "Say hello.", "completion": "Hello!", "label": "yes"},
    {"prompt": "Say hello.", "completion": "Go away.", "label": "False"},
]


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _params(data: Path, **extra) -> tunelab.LLMParams:
    values = {"model": "unused", "data_path": str(data), "trainer": "kto", "block_size": 64, "model_max_length": 128}
    values["max_prompt_length"] = 32
    return tunelab.LLMParams(**{**values, **extra})


def thumbs_from_pairs(rows: list[dict], seed: int = 0) -> list[dict]:
    """A thumbs-up/down export built from HH pairs: each pair's prompt with one of its answers, the chosen one
    marked desirable, shuffled so that no row sits next to its pair."""
    out = []
    for row in rows:
        cut = split_common_prefix(row["chosen"], row["rejected"])
        prompt = row["chosen"][:cut]
        out.append({"prompt": prompt, "completion": row["chosen"][cut:], "label": True})
        out.append({"prompt": prompt, "completion": row["rejected"][cut:], "label": False})
    random.Random(seed).shuffle(out)
    return out


# ------------------------------------------------------------------------------------------------ data


def test_thumbs_rows_become_labeled_answers(tmp_path, tiny_tokenizer):
    data = load_kto_data(_params(_write(tmp_path / "t.jsonl", THUMBS), chat_template="chatml"), tiny_tokenizer)
    assert [item.desirable for item in data.train] == [True, False, True, False, True, False]
    item = data.train[0]
    assert tiny_tokenizer.decode(item.prompt_ids).endswith("Name a colour.<|im_end|>\n<|im_start|>assistant\n")
    assert tiny_tokenizer.decode(item.completion_ids).startswith("Blue.<|im_end|>")
    assert data.describe().startswith("kto (prompt='prompt', completion='completion', label='label')")


def test_preference_pairs_are_unpaired(tmp_path, tiny_tokenizer):
    rows = [{"prompt": f"Q{i}?", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(3)]
    data = load_kto_data(_params(_write(tmp_path / "p.jsonl", rows)), tiny_tokenizer)
    assert len(data.train) == 6 and sum(item.desirable for item in data.train) == 3
    good, bad = data.train[0], data.train[1]
    assert good.prompt_ids == bad.prompt_ids and good.desirable and not bad.desirable
    assert tiny_tokenizer.decode(good.completion_ids).startswith("good 0")


def test_llama_factory_kto_rows_label_each_conversation_s_last_answer(tmp_path, tiny_tokenizer):
    """LLaMA-Factory's KTO datasets (its kto_en_demo.json): a ShareGPT `conversations` whose last answer is the one
    `kto_tag` labels, earlier turns and a `system` column the prompt."""
    rows = [
        {
            "conversations": [
                {"from": "human", "value": "Hi."},
                {"from": "gpt", "value": "Hello."},
                {"from": "human", "value": "Name a colour."},
                {"from": "gpt", "value": answer},
            ],
            "kto_tag": tag,
            "system": "Be brief.",
        }
        for answer, tag in (("Blue.", True), ("I will not.", False))
    ]
    (tmp_path / "kto.json").write_text(json.dumps(rows), encoding="utf-8")
    data = load_kto_data(_params(tmp_path / "kto.json", max_prompt_length=64), tiny_tokenizer)
    assert [item.desirable for item in data.train] == [True, False]
    assert data.describe().startswith("kto (prompt='conversations', completion='conversations', label='kto_tag')")
    prompt = tiny_tokenizer.decode(data.train[0].prompt_ids)
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi.<|im_end|>\n")
    assert prompt.endswith("Hello.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n")
    assert tiny_tokenizer.decode(data.train[1].completion_ids).startswith("I will not.<|im_end|>")
    rows[0]["conversations"].append({"from": "human", "value": "Thanks."})  # goes on after the labeled answer
    (tmp_path / "kto.json").write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(DataError, match="conversations': the conversation goes on after its last answer"):
        load_kto_data(_params(tmp_path / "kto.json", max_prompt_length=64), tiny_tokenizer)


def test_llama_factory_alpaca_kto_rows_keep_their_input_history_and_system(tmp_path, tiny_tokenizer):
    """Its Alpaca KTO rows (`instruction`, `input`, `output`, `kto_tag`, with `history` and `system`) are templated
    as the pairs are (alpaca, chat_template unset; chatml when set), nothing of the prompt lost."""
    rows = [
        {"instruction": "Name a colour.", "input": "One word.", "output": answer, "kto_tag": tag,
         "history": [["Hi.", "Hello."]], "system": "Be brief."}
        for answer, tag in (("Blue.", True), ("I will not.", False))
    ]  # fmt: skip
    path = _write(tmp_path / "kto.jsonl", rows)
    data = load_kto_data(_params(path, max_prompt_length=96, block_size=128), tiny_tokenizer)
    assert data.describe().startswith("kto (prompt='instruction', completion='output', label='kto_tag')")
    assert data.template == "alpaca" and [item.desirable for item in data.train] == [True, False]
    assert tiny_tokenizer.decode(data.train[0].prompt_ids) == (
        "Be brief.\n\n### Instruction:\nHi.\n\n### Response:\nHello.</s>\n\n### Instruction:\nName a colour.\n"
        "One word.\n\n### Response:\n"
    )
    assert tiny_tokenizer.decode(data.train[0].completion_ids).startswith("Blue.</s>")
    data = load_kto_data(_params(path, max_prompt_length=96, block_size=128, chat_template="chatml"), tiny_tokenizer)
    assert tiny_tokenizer.decode(data.train[1].prompt_ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi.<|im_end|>\n<|im_start|>assistant\nHello."
        "<|im_end|>\n<|im_start|>user\nName a colour.\nOne word.<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("paired_train", [False, True], ids=["thumbs-train", "pairs-train"])
def test_valid_split_of_another_shape_than_train(tmp_path, tiny_tokenizer, paired_train):
    pairs = [{"prompt": f"Q{i}?", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(3)]
    train, valid = (pairs, THUMBS) if paired_train else (THUMBS, pairs)
    _write(tmp_path / "data" / "train.jsonl", train)
    _write(tmp_path / "data" / "valid.jsonl", valid)
    shapes = ["unpaired rows (prompt, answer and label)", "preference pairs (prompt/chosen/rejected)"]
    mine, other = shapes if paired_train else shapes[::-1]
    expected = f"{tmp_path / 'data' / 'valid.jsonl'}: holds {mine}, but the train split "
    expected += f"{tmp_path / 'data' / 'train.jsonl'} holds {other}: give both splits the same shape"
    with pytest.raises(DataError) as err:
        load_kto_data(_params(tmp_path / "data", valid_split="valid"), tiny_tokenizer)
    assert str(err.value) == expected


# ------------------------------------------------------------------------------------------------ bad input


def _run_bad(capsys, tiny_llama, tmp_path, rows, *extra) -> str:
    data = _write(tmp_path / "train.jsonl", rows)
    project = tmp_path / "run"
    args = ["llm", "--train", "--trainer", "kto", "--model", str(tiny_llama), "--data-path", str(data)]
    args += ["--block-size", "64", "--max-prompt-length", "32", "--model-max-length", "128", "--max-steps", "2"]
    args += ["--project-name", str(project)]
    line = error_line(capsys, main([*args, *extra]))
    assert_nothing_written(project)
    return line


@pytest.mark.parametrize(
    ("rows", "extra", "expected"),
    [
        (
            [*THUMBS[:2], {**THUMBS[2], "label": "maybe"}],
            [],
            "train.jsonl line 3, column 'label': the label 'maybe' is not a boolean (true/false, 1/0, yes/no)",
        ),
        ([{**THUMBS[2], "label": 7}, *THUMBS], [], "line 1, column 'label': the label 7 is not a boolean"),
        ([r for r in THUMBS if r["label"] in (True, "true", "yes")], [], "every answer is desirable (label true"),
        ([{"prompt": "a", "completion": "b", "verdict": True}] * 2, [], "no label column 'label'"),
        (THUMBS, ["--batch-size", "1"], "batch_size must be at least 2"),
        (THUMBS, ["--kto-beta", "0"], "kto_beta must be positive"),
    ],
    ids=["label-word", "label-number", "one-class", "no-label-column", "batch-of-one", "beta-zero"],
)
def test_bad_kto_input_is_one_line_before_training(capsys, tiny_llama, tmp_path, rows, extra, expected):
    assert expected in _run_bad(capsys, tiny_llama, tmp_path, rows, *extra)


def test_unbalanced_classes_are_rebalanced_and_the_log_says_so(tmp_path, tiny_llama):
    rows = [r for r in THUMBS if r["label"] in (True, "true", "yes")] * 3 + [THUMBS[1]]
    result = tunelab.plan(_params(_write(tmp_path / "u.jsonl", rows), model=str(tiny_llama), batch_size=4))
    note = next(n for n in result.splits[0].notes if n.startswith("kto:"))
    assert (
        "9 desirable and 1 undesirable answers; desirable_weight 0.1111, undesirable_weight 1 (set to balance" in note
    )


def test_the_class_weights_note_follows_the_weights_given_from_the_cache(tmp_path, tiny_llama):
    """The note on the class weights is made with the rows, which the prepared-data cache keeps: another
    desirable_weight must not reuse the note of the run before."""
    data = _write(tmp_path / "u.jsonl", [r for r in THUMBS if r["label"] in (True, "true", "yes")] * 3 + [THUMBS[1]])
    first = tunelab.plan(_params(data, model=str(tiny_llama), batch_size=4))
    given = tunelab.plan(_params(data, model=str(tiny_llama), batch_size=4, desirable_weight=0.2))
    note = next(n for n in given.splits[0].notes if n.startswith("kto:"))
    assert "desirable_weight 0.2, undesirable_weight 1 (as given" in note
    assert first.splits[0].notes != given.splits[0].notes


def test_valid_size_leaving_one_kind_to_train_on_is_one_line_and_a_one_kind_valid_split_trains(tmp_path, tiny_llama):
    from tunelab.tasks.llm import prepare

    rows = [{"prompt": f"Q{n}?", "completion": f"A{n}.", "label": n == 0} for n in range(3)]
    data = _write(tmp_path / "k.jsonl", rows)
    outcomes = set()
    for seed in range(12):  # the one desirable answer lands on either side, by seed
        try:
            prep = prepare(_params(data, model=str(tiny_llama), batch_size=2, valid_size=1, seed=seed))
        except DataError as err:
            assert "(less the examples valid_size held out): every answer is undesirable" in str(err)
            outcomes.add("refused")
        else:  # a validation split of one kind is fine: only training needs the contrast
            assert len(prep.valid_rows) == 1
            outcomes.add("prepared")
    assert outcomes == {"refused", "prepared"}


# ------------------------------------------------------------------------------------------------ training


@needs_shared()
def test_kto_trains_a_tiny_model(tmp_path, tiny_llama):
    rows = json.loads(json.dumps(thumbs_from_pairs(_hh(24))))
    data = _write(tmp_path / "thumbs" / "train.jsonl", rows)
    params = _params(
        data, model=str(tiny_llama), block_size=128, max_prompt_length=64, model_max_length=256, lr=1e-3,
        batch_size=4, epochs=3, logging_steps=2, project_name=str(tmp_path / "kto"),
    )  # fmt: skip
    folder = tunelab.train(params)
    losses = train_losses(folder)
    assert statistics.mean(losses[-3:]) < statistics.mean(losses[:3]), losses
    logged = [r for r in read_metrics(folder) if "kl" in r]
    assert logged and all(r["kl"] >= 0 for r in logged)
    assert json.loads((folder / "tunelab_run.json").read_text())["trainer"] == "kto"


def _short_hh(n: int) -> list[dict]:
    """The n shortest HH pairs whose two answers both say something (a dozen words or so)."""
    rows = []
    for row in _hh(1500):
        cut = split_common_prefix(row["chosen"], row["rejected"])
        if min(len(row["chosen"]) - cut, len(row["rejected"]) - cut) >= 40:
            rows.append(row)
    return sorted(rows, key=lambda r: len(r["chosen"]) + len(r["rejected"]))[:n]


def _hh(n: int) -> list[dict]:
    lines = (SHARED_DATA / "preference" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:n]]


@pytest.mark.slow
@needs_shared()
@pytest.mark.parametrize("trainer", ["kto", "simpo"])
def test_default_model_kto_on_thumbs_and_simpo_on_pairs(trainer, tmp_path):
    """SmolLM2-135M-Instruct with LoRA: KTO on a thumbs-up/down file built from the shared HH pairs, SimPO on the
    pairs themselves; the loss falls and the reward margin (chosen minus rejected) rises."""
    # Four short pairs, seen four times: a CPU step of the default model costs seconds per hundred tokens, and on
    # rows it has seen the model's preference moves clearly.
    pairs = _short_hh(4)
    rows = thumbs_from_pairs(pairs) if trainer == "kto" else pairs
    data = _write(tmp_path / "data" / "train.jsonl", rows)
    project = tmp_path / trainer
    args = ["llm", "--train", "--trainer", trainer, "--peft", "--data-path", str(data), "--project-name", str(project)]
    args += ["--block-size", "128", "--max-prompt-length", "96", "--lr", "5e-4"]
    args += ["--batch-size", "4" if trainer == "kto" else "2", "--max-steps", "8", "--logging-steps", "1"]
    args += ["--disable-gradient-checkpointing", "--lora-r", "16"]
    if trainer == "simpo":
        args += ["--dpo-beta", "2.0", "--simpo-gamma", "0.5"]
    assert main(args) == 0
    losses = train_losses(project)
    margins = [r["rewards/margins"] for r in read_metrics(project) if "rewards/margins" in r]
    third = max(1, len(losses) // 3)
    assert statistics.mean(losses[-third:]) < statistics.mean(losses[:third]), losses
    assert len(margins) >= 6 and statistics.mean(margins[-third:]) > statistics.mean(margins[:third]), margins
