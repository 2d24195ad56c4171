"""`--dry-run` (and `tunelab.plan(...)`): what a run would be, from the same checks a real run makes first.

Each task's spine makes its plan (tasks/llm.plan, tasks/text_classification.plan) from the very `prepare` step
its run starts with: the data is read, checked, formatted, tokenized and cut into rows; the model's config is read
but no weights are loaded and nothing is written. This module holds what the plans share: the RunPlan and its
text, the steps as the Trainer counts them, the examples with their trained tokens marked, the memory figure.
The plan shows rows per split, token lengths, what was truncated or dropped and why, the first examples, the
steps, and an estimate of peak memory against the device found.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tunelab.config.base import RunParams
from tunelab.data.tokenize import IGNORE
from tunelab.models.freeze import is_freezing
from tunelab.training.steps import epoch_steps

TRAINED_OPEN, TRAINED_CLOSE = "[[", "]]"  # marks the tokens the loss is computed on in the shown examples


@dataclass
class SplitSummary:
    name: str
    origin: str
    examples: int
    rows: int
    lengths: Any  # tokens per example (a list or an array) after formatting, before truncation
    notes: list[str] = field(default_factory=list)

    def length_line(self) -> str:
        if not len(self.lengths):
            return "no examples"
        ordered = np.sort(np.asarray(self.lengths))
        p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
        return f"tokens per example: min {ordered[0]}, median {np.median(ordered):.0f}, p95 {p95}, max {ordered[-1]}"


@dataclass
class RunPlan:
    """What a run would do; `render()` is the text `--dry-run` prints."""

    task: str
    model: str
    splits: list[SplitSummary]
    examples: list[str]
    steps_per_epoch: int
    total_steps: int
    effective_batch: int
    memory: Any = None  # memory.MemoryEstimate, or None when the model's config could not be read
    device: str = ""
    available: int = 0
    notes: list[str] = field(default_factory=list)
    label_counts: dict[str, dict[str, int]] = field(default_factory=dict)  # classifiers: {split: {label: texts}}

    @property
    def fits(self) -> bool | None:
        return None if self.memory is None else self.memory.fits(self.available)

    @property
    def classifier(self) -> bool:
        return bool(self.label_counts)  # only a classifier's plan counts labels

    def render(self) -> str:
        lines = [f"dry run: {self.task} on {self.model} (nothing trained, no project folder written)"]
        for split in self.splits:
            lines.append(f"  {split.name} ({split.origin}): {split.examples} examples -> {split.rows} rows")
            lines.append(f"    {split.length_line()}")
            lines += [f"    {note}" for note in split.notes]
        lines += [f"  {note}" for note in self.notes]
        lines.append(
            f"  steps: {self.steps_per_epoch} per epoch, {self.total_steps} in all "
            f"(effective batch {self.effective_batch} rows)"
        )
        if self.memory is not None:
            verdict = "fits" if self.fits else "DOES NOT FIT"
            lines.append(f"  memory: {self.memory.describe()}")
            lines.append(f"  device: {self.device}, {self.available / 2**30:.1f} GiB free: {verdict}")
        for number, example in enumerate(self.examples, start=1):
            # A classifier's example is its text and label: no tokens of it are marked.
            marks = f"the loss is on the tokens between {TRAINED_OPEN} {TRAINED_CLOSE}"
            lines.append(f"  example {number} as trained ({'text -> label' if self.classifier else marks}):")
            lines += ["    " + line for line in example.splitlines()]
        return "\n".join(lines)


def marked_text(input_ids: list[int], labels: list[int], tokenizer: Any, limit: int = 700) -> str:
    """Decode an example with its trained spans wrapped in [[ ]]."""
    pieces, run, trained = [], [], None
    for token, label in zip(input_ids, labels, strict=True):
        is_trained = label != IGNORE
        if run and is_trained != trained:
            pieces.append(_piece(run, trained, tokenizer))
            run = []
        run.append(token)
        trained = is_trained
    if run:
        pieces.append(_piece(run, trained, tokenizer))
    text = _REPEATED.sub(_counted, "".join(pieces))
    return text if len(text) <= limit else text[:limit] + f" ... ({len(text) - limit} more characters)"


# A special token written many times over (an image's hundreds of <|image_pad|>), shown once with its count.
_REPEATED = re.compile(r"(<[^<>\s]{1,40}>)\1{3,}")


def _counted(match: re.Match) -> str:
    token = match.group(1)
    return f"{token} x{len(match.group(0)) // len(token)}"


def _piece(ids: list[int], trained: bool | None, tokenizer: Any) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=False)
    return f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if trained else text


def processes(params: RunParams) -> int:
    return params.num_processes * params.num_machines


def steps(rows: int, params: RunParams) -> tuple[int, int]:
    """(steps per epoch, total steps) as transformers' Trainer will count them, all processes together."""
    per_epoch = epoch_steps(rows, params, processes(params))
    total = params.max_steps if params.max_steps > 0 else per_epoch * params.epochs
    return per_epoch, total


def new_plan(
    task: str, params: RunParams, splits: list[SplitSummary], examples: list[str], rows: int, resume_from: Any
) -> RunPlan:
    """A plan with the parts every task counts the same way: the steps, the effective batch, LoRA or not, and the
    checkpoint the run would resume from."""
    per_epoch, total = steps(rows, params)
    plan = RunPlan(
        task=task
        + (" (LoRA)" if params.peft else " (freeze training)" if is_freezing(params) else " (full fine-tuning)"),
        model=params.model,
        splits=splits,
        examples=examples,
        steps_per_epoch=per_epoch,
        total_steps=total,
        effective_batch=params.batch_size * params.gradient_accumulation * processes(params),
    )
    if resume_from is not None:
        plan.notes.append(f"would resume from {resume_from}")
    return plan


def add_memory(result: RunPlan, config: Any, params: RunParams, rows: int, longest: int, kind: str) -> None:
    """The peak-memory estimate for micro-batches of `rows` x `longest` tokens, from the model's config alone (the
    one the prepare step read), and what a freeze run trains, which it counts."""
    from tunelab.models.checks import freeze_choice

    choice = freeze_choice(config, params, kind)
    if choice is not None:
        result.notes.append(
            f"freeze training: {choice.describe()} train (the rest frozen); the layers before layer "
            f"{choice.first_layer} of {choice.layers} keep no activations"
        )
    if processes(params) > 1:
        backend = params.distributed_backend or "ddp"
        result.notes.append(
            f"would launch {processes(params)} processes ({backend}) through accelerate; the memory below is per "
            "process without sharding (fsdp/deepspeed divide weights, gradients and optimizer states among them)"
        )
    from tunelab.memory import run_estimate

    try:
        result.memory, result.device, result.available = run_estimate(config, params, rows, longest, kind)
    except (OSError, ValueError, KeyError) as err:  # a config the estimate cannot read: the plan still stands
        result.notes.append(f"memory: not estimated ({type(err).__name__}: {err})")
