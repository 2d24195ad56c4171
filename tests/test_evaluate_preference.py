"""`tunelab evaluate` on preference runs: tiny dpo, simpo, reward and kto runs measured on their own kind of data,
each figure checked against the same figure computed here by hand (the answers' log-probs from the model's logits,
with and without the adapter; the reward model's scores through `tunelab score`'s function)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tunelab
from tunelab.cli import main
from tunelab.inference.evaluate import evaluate_run

COLOURS = ["red", "green", "grey", "pink", "gold", "teal", "plum", "navy"]
CHOSEN = " The answer is blue."


def _pairs(n: int, start: int = 0) -> list[dict]:
    """Pairs whose chosen answer is always the same learnable sentence, the rejected one varies."""
    return [
        {
            "prompt": f"Question {i}: which colour is the sky?",
            "chosen": CHOSEN,
            "rejected": f" It is {COLOURS[i % len(COLOURS)]} and {COLOURS[(i * 3 + 1) % len(COLOURS)]}, maybe.",
        }
        for i in range(start, start + n)
    ]


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _train(model: Path, data: Path, folder: Path, trainer: str, **extra) -> Path:
    values = {
        "model": str(model), "data_path": str(data), "trainer": trainer, "project_name": str(folder),
        "block_size": 64, "model_max_length": 128, "max_prompt_length": 32, "batch_size": 4,
        "gradient_accumulation": 1, "max_steps": 12, "logging_steps": 4, "lr": 5e-3,
        "disable_gradient_checkpointing": True, "eval_strategy": "no",
    }  # fmt: skip
    return tunelab.train(tunelab.LLMParams(**{**values, **extra}))


def _answer_logps(model, tokenizer, prompt: str, answer: str, counted: int | None = None, rest: float = 1.0):
    """log p(answer | prompt) summed over the answer's tokens (text rows: the answer ends with EOS); the tokens past
    the first `counted` weighted by `rest` (LD-DPO's ld_alpha)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(prompt + answer + tokenizer.eos_token)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
    per_token = torch.stack([logps[i - 1, ids[i]] for i in range(len(prompt_ids), len(ids))])
    counted = len(per_token) if counted is None else counted
    return per_token[:counted].sum() + rest * per_token[counted:].sum()


def _answer_lengths(tokenizer, rows: list[dict]) -> torch.Tensor:
    def length(prompt: str, answer: str) -> int:
        return len(tokenizer(prompt + answer + tokenizer.eos_token)["input_ids"]) - len(tokenizer(prompt)["input_ids"])

    return torch.tensor([[length(r["prompt"], r[side]) for side in ("chosen", "rejected")] for r in rows])


def _by_hand(folder: Path, base: Path, rows: list[dict], adapter: bool, ld_alpha: float = 1.0):
    """(policy, reference) log-prob sums of each row's chosen and rejected answer: (N, 2) each. With an adapter the
    reference is the base with the adapter off; without, the base model loaded as it is. `ld_alpha`: the weight of
    each answer's tokens past the shorter one's length (LD-DPO)."""
    from peft import PeftModel

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if adapter:
        policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), folder)
    else:
        policy = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    policy.eval()

    shared = _answer_lengths(tokenizer, rows).min(dim=1).values.tolist()

    def sums(model) -> torch.Tensor:
        return torch.tensor(
            [
                [_answer_logps(model, tokenizer, r["prompt"], r[side], n, ld_alpha) for side in ("chosen", "rejected")]
                for r, n in zip(rows, shared, strict=True)
            ]
        )

    tuned = sums(policy)
    if adapter:
        with policy.disable_adapter():
            reference = sums(policy)
    else:
        reference = sums(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval())
    return tuned, reference


# --------------------------------------------------------------------------------------------------- dpo


@pytest.fixture(scope="module")
def dpo_run(tiny_llama, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dpo-eval")
    _write(folder / "data" / "train.jsonl", _pairs(16))
    _write(folder / "data" / "test.jsonl", _pairs(8, start=100))
    return _train(tiny_llama, folder / "data", folder / "run", "dpo", peft=True, lora_r=8, dpo_beta=0.5)


def test_dpo_run_is_measured_by_its_rewards_on_pairs(dpo_run, tiny_llama, capsys):
    data = dpo_run.parent / "data"
    code = main(["evaluate", "--model", str(dpo_run), "--data-path", str(data), "--compare-base", "--samples", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    results = json.loads((dpo_run / "evaluation" / "results.json").read_text())

    tuned, reference = _by_hand(dpo_run, tiny_llama, _pairs(8, start=100), adapter=True)
    rewards = 0.5 * (tuned - reference)
    assert results["method"] == "dpo" and results["rows"] == 8 and results["unit"] == "pairs"
    expected = {
        "rewards/accuracies": (rewards[:, 0] > rewards[:, 1]).float().mean(),
        "rewards/margins": (rewards[:, 0] - rewards[:, 1]).mean(),
        "rewards/chosen": rewards[:, 0].mean(),
        "rewards/rejected": rewards[:, 1].mean(),
        "logps/chosen": tuned[:, 0].mean(),
        "logps/rejected": tuned[:, 1].mean(),
    }
    for name, value in expected.items():
        assert results[name] == pytest.approx(float(value), abs=1e-4), name
    # Trained towards the fixed answer: most held-out pairs now prefer it; before training (the policy equal to its
    # reference) every reward was 0, and no pair's chosen reward was above its rejected one.
    assert results["rewards/accuracies"] >= 0.75 and results["rewards/margins"] > 0
    # The base is the reference here: said once, not shown as a row of zeros.
    assert results["base_is_reference"] and not any(key.startswith("base_rewards") for key in results)
    assert "rewards/accuracies" in out and "is the reference the rewards are measured against" in out
    report = (dpo_run / "evaluation" / "report.md").read_text()
    assert "| fine-tuned |" in report and "rewards/margins" in report and "the reference the rewards" in report
    assert results["reference"] == "the base model with the adapter off"
    # Sample answers, generated from each pair's prompt, beside its two answers.
    assert len(results["samples"]) == 2
    sample = results["samples"][0]
    assert sample["prompt"] == "Question 100: which colour is the sky?" and sample["reference"] == CHOSEN.strip()
    assert sample["rejected"].startswith("It is") and isinstance(sample["tuned"], str) and sample["base"] is not None


def test_a_dpo_run_with_the_loss_variants_learns_and_is_measured_with_its_length_weighting(tiny_llama, tmp_path):
    """dpo's variants at once (the discopop loss under the JS divergence, LD-DPO, WPO's weights): the run learns the
    pairs, and `tunelab evaluate` sums each answer as training did, the tokens past the shorter answer's length at
    ld_alpha."""
    data = _write(tmp_path / "data" / "train.jsonl", _pairs(16))
    variants = {"dpo_loss_type": "discopop", "f_divergence_type": "js_divergence", "ld_alpha": 0.5}
    run = _train(
        tiny_llama, data.parent, tmp_path / "run", "dpo", peft=True, lora_r=8, dpo_beta=0.5, use_weighting=True,
        **variants,
    )  # fmt: skip
    held_out = _pairs(8, start=100)
    results = evaluate_run(run, str(_write(tmp_path / "test.jsonl", held_out)), samples=0)

    tuned, reference = _by_hand(run, tiny_llama, held_out, adapter=True, ld_alpha=0.5)
    rewards = 0.5 * (tuned - reference)
    assert results["rewards/margins"] == pytest.approx(float((rewards[:, 0] - rewards[:, 1]).mean()), abs=1e-4)
    assert results["logps/rejected"] == pytest.approx(float(tuned[:, 1].mean()), abs=1e-4)
    plain, _ = _by_hand(run, tiny_llama, held_out, adapter=True)
    assert abs(float(plain[:, 1].mean() - tuned[:, 1].mean())) > 0.1  # the weighting changed the sums
    assert results["rewards/accuracies"] >= 0.75 and results["rewards/margins"] > 0


def test_a_bad_row_in_the_evaluation_pairs_is_one_line(dpo_run, tmp_path, capsys):
    no_rejected = _write(tmp_path / "chosen-only.jsonl", [{"prompt": "Q?", "chosen": "A."}] * 2)
    assert main(["evaluate", "--model", str(dpo_run), "--data-path", str(no_rejected)]) == 2
    assert f"tunelab: error: {no_rejected}: rejected column 'rejected' not found" in capsys.readouterr().err

    rows = _pairs(3)
    del rows[1]["rejected"]
    bad = _write(tmp_path / "bad.jsonl", rows)
    result = subprocess.run(
        [sys.executable, "-m", "tunelab", "evaluate", "--model", str(dpo_run), "--data-path", str(bad)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("tunelab: error:")]
    assert len(lines) == 1 and f"{bad} line 2, column 'rejected': missing value" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------------------- simpo, reward


@pytest.mark.parametrize(
    ("trainer", "extra"),
    [("simpo", {"lr": 1e-3}), ("orpo", {"peft": True, "lora_r": 8})],
    ids=["simpo-full", "orpo-lora"],
)
def test_simpo_and_orpo_runs_are_measured_by_mean_log_prob_accuracy_beside_the_base(
    trainer, extra, tiny_llama, tmp_path
):
    """No reference: the rewards are beta times each answer's mean log-prob per token, as these methods log them;
    the base (a full fine-tune's base model loaded beside it, a LoRA run's adapter off) measured the same way."""
    data = _write(tmp_path / "data" / "train.jsonl", _pairs(16))
    run = _train(tiny_llama, data.parent, tmp_path / trainer, trainer, **extra)
    held_out = _write(tmp_path / "test.jsonl", _pairs(8, start=100))
    results = evaluate_run(run, str(held_out), compare_base=True, samples=1, max_new_tokens=4)

    tuned, base = _by_hand(run, tiny_llama, _pairs(8, start=100), adapter="peft" in extra)
    lengths = _answer_lengths(AutoTokenizer.from_pretrained(run), _pairs(8, start=100))
    for prefix, sums in (("", tuned), ("base_", base)):
        means = sums / lengths
        accuracy = float((means[:, 0] > means[:, 1]).float().mean())
        assert results[f"{prefix}rewards/accuracies"] == pytest.approx(accuracy, abs=1e-6), prefix
        margin = float((0.1 * (means[:, 0] - means[:, 1])).mean())  # beta (dpo_beta) times the mean log-prob
        assert results[f"{prefix}rewards/margins"] == pytest.approx(margin, abs=1e-4), prefix
        assert results[f"{prefix}logps/chosen"] == pytest.approx(float(means[:, 0].mean()), abs=1e-4), prefix
    assert results["method"] == trainer and results["rewards/margins"] > results["base_rewards/margins"]
    assert "reference" not in results and "base_is_reference" not in results


def test_reward_run_accuracy_is_that_of_tunelab_score(tiny_llama, tmp_path):
    from tunelab.inference.score import load_reward_model, score

    # trained with margins (a column named margin); measured on pairs without them: the scores need none
    data = _write(tmp_path / "data" / "train.jsonl", [{**p, "margin": 0.5} for p in _pairs(16)])
    run = _train(tiny_llama, data.parent, tmp_path / "reward", "reward", lr=3e-3, center_rewards_coefficient=0.01)
    held_out = _pairs(8, start=100)
    results = evaluate_run(run, str(_write(tmp_path / "test.jsonl", held_out)))

    model, tokenizer, eos = load_reward_model(run)
    chosen = torch.tensor(score(model, tokenizer, [r["prompt"] + r["chosen"] for r in held_out], eos))
    rejected = torch.tensor(score(model, tokenizer, [r["prompt"] + r["rejected"] for r in held_out], eos))
    assert results["method"] == "reward" and results["rows"] == 8
    assert results["accuracy"] == pytest.approx(float((chosen > rejected).float().mean()), abs=1e-6)
    assert results["margin"] == pytest.approx(float((chosen - rejected).mean()), abs=1e-4)
    assert results["accuracy"] > 0.5
    report = (run / "evaluation" / "report.md").read_text()
    assert "| reward model |" in report


# --------------------------------------------------------------------------------------------------- kto


def test_kto_run_on_its_labeled_answers_and_on_pairs(tiny_llama, tmp_path):
    """A kto run (trained on pairs, bad rows skipped) measured on thumbs-up/down rows and on pairs: the rewards of
    each kind of answer, and on pairs the share of pairs whose desirable answer has the higher reward. The run's
    bad_rows: skip leaves a bad evaluation row out, as training did."""
    data = _write(tmp_path / "data" / "train.jsonl", _pairs(16))
    run = _train(tiny_llama, data.parent, tmp_path / "kto", "kto", peft=True, lora_r=8, bad_rows="skip")
    held_out = _pairs(6, start=100)
    tuned, reference = _by_hand(run, tiny_llama, held_out, adapter=True)
    rewards = 0.1 * (tuned - reference)  # kto_beta

    thumbs = [
        {"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
        for r in held_out
        for side in ("chosen", "rejected")
    ]
    labeled = evaluate_run(run, str(_write(tmp_path / "thumbs.jsonl", thumbs)), samples=1, max_new_tokens=4)
    assert labeled["unit"] == "answers" and labeled["rows"] == 12 and "rewards/accuracies" not in labeled
    assert labeled["rewards/chosen"] == pytest.approx(float(rewards[:, 0].mean()), abs=1e-4)
    assert labeled["rewards/rejected"] == pytest.approx(float(rewards[:, 1].mean()), abs=1e-4)
    assert labeled["logps/rejected"] == pytest.approx(float(tuned[:, 1].mean()), abs=1e-4)

    pairs = evaluate_run(run, str(_write(tmp_path / "pairs.jsonl", [*held_out, {"prompt": "Q?"}])), samples=0)
    assert pairs["unit"] == "pairs" and pairs["rows"] == 6
    assert pairs["rewards/accuracies"] == pytest.approx(float((rewards[:, 0] > rewards[:, 1]).float().mean()))
    assert pairs["rewards/margins"] == pytest.approx(float((rewards[:, 0] - rewards[:, 1]).mean()), abs=1e-4)
    assert pairs["rows_left_out_or_cut"] == {"bad_rows_skipped": 1}
