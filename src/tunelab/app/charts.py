"""The job page's charts and the comparison of runs: which metrics.jsonl series each chart draws, and what differs
between the parameters of several jobs.

A chart is drawn when the run logged any of its series, so each method gets its own without being told which it
is: the losses, learning rate, gradient norm, throughput and memory of every run; reward margin and accuracy of the
preference methods; the reward (total and per function), KL, completion length, entropy and tool calls of grpo;
accuracy and macro F1 of a classifier (per evaluation); a mixture of experts' load-balancing loss.
"""

from __future__ import annotations

import re
from typing import Any

# (chart id, title, the series it draws: exact keys, or patterns for the per-reward-function keys)
CHARTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("loss", "Loss", ("loss", "eval_loss")),
    ("lr", "Learning rate", ("learning_rate",)),
    ("grad_norm", "Gradient norm", ("grad_norm",)),
    ("tokens", "Trained tokens per second", ("trained_tokens_per_second",)),
    ("memory", "Peak memory (GiB)", ("peak_memory_gib",)),
    ("accuracy", "Accuracy and macro F1 (validation)", ("eval_accuracy", "eval_macro_f1")),
    ("margin", "Reward margin (chosen - rejected)", ("rewards/margins", "eval_rewards/margins")),
    ("reward_accuracy", "Reward accuracy", ("rewards/accuracies", "eval_rewards/accuracies", "accuracy")),
    ("reward", "Reward (total and per function)", ("reward", r"re:rewards/.+/mean")),
    ("kl", "KL to the reference", ("kl", "eval_kl", "objective/kl", "eval_objective/kl")),
    ("completion_length", "Completion length (tokens)", ("completions/mean_length", "completions/max_length")),
    ("entropy", "Entropy of the sampled tokens", ("entropy", "eval_entropy")),
    (
        "tools",
        "Tool calls per completion, and the share that failed",
        (
            "tools/call_frequency",
            "eval_tools/call_frequency",
            "tools/failure_frequency",
            "eval_tools/failure_frequency",
        ),
    ),
    ("aux_loss", "Experts' load-balancing loss (mixture of experts)", ("aux_loss", "eval_aux_loss")),
)
NOT_SERIES = ("step", "epoch", "time")
NOT_CHOICES = ("project_name",)  # each job's own folder: always different, never a setting to compare


def _matches(key: str, wanted: str) -> bool:
    return bool(re.fullmatch(wanted[3:], key)) if wanted.startswith("re:") else key == wanted


def series(records: list[dict[str, Any]]) -> dict[str, list[list[float]]]:
    """Every numeric metric logged, as [step, value] pairs (in logging order)."""
    out: dict[str, list[list[float]]] = {}
    for record in records:
        step = record.get("step")
        if step is None:
            continue
        for key, value in record.items():
            if key not in NOT_SERIES and isinstance(value, (int, float)) and not isinstance(value, bool):
                out.setdefault(key, []).append([step, value])
    return out


def charts(points: dict[str, list[list[float]]]) -> list[dict[str, Any]]:
    """The charts a run's series fill: [{"id", "title", "series": {key: points}}], in CHARTS order."""
    drawn = []
    for chart_id, title, wanted in CHARTS:
        found = {key: values for key, values in points.items() if any(_matches(key, w) for w in wanted)}
        if found:
            drawn.append({"id": chart_id, "title": title, "series": found})
    return drawn


def differing_params(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The parameters whose values are not the same in every job: [{"name", "values": [one per job]}]."""
    names = sorted({name for job in jobs for name in job["params"] if name not in NOT_CHOICES})
    rows = []
    for name in names:
        values = [job["params"].get(name) for job in jobs]
        if any(value != values[0] for value in values[1:]):
            rows.append({"name": name, "values": values})
    return rows


def final_values(jobs_metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The final metrics of several jobs side by side: [{"name", "values": [one per job, None when missing]}]."""
    names = sorted({k for m in jobs_metrics for k, v in m.items() if isinstance(v, (int, float))})
    return [{"name": name, "values": [m.get(name) for m in jobs_metrics]} for name in names]
