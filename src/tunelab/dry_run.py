"""`--dry-run` (and `tunelab.plan(...)`): what a run would be, from the same checks a real run makes first.

The data is read, checked, formatted, tokenized and cut into rows by the very code a run uses (run.prepare,
classify.prepare); the model's config is read but no weights are loaded and nothing is written. The plan shows
rows per split, token lengths, what was truncated or dropped and why, the first examples with the trained tokens
marked, the steps, and an estimate of peak memory against the device found.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from tunelab.data.tokenize import IGNORE

TRAINED_OPEN, TRAINED_CLOSE = "[[", "]]"  # marks the tokens the loss is computed on in the shown examples


@dataclass
class SplitSummary:
    name: str
    origin: str
    examples: int
    rows: int
    lengths: list[int]  # tokens per example after formatting, before truncation
    notes: list[str] = field(default_factory=list)

    def length_line(self) -> str:
        if not self.lengths:
            return "no examples"
        ordered = sorted(self.lengths)
        p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
        return (
            f"tokens per example: min {ordered[0]}, median {statistics.median(ordered):.0f}, p95 {p95}, "
            f"max {ordered[-1]}"
        )


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

    @property
    def fits(self) -> bool | None:
        return None if self.memory is None else self.memory.fits(self.available)

    def render(self) -> str:
        lines = [f"dry run: {self.task} on {self.model} (nothing trained, nothing written)"]
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
            lines.append(
                f"  example {number} as trained (the loss is on the tokens between {TRAINED_OPEN} {TRAINED_CLOSE}):"
            )
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
    text = "".join(pieces)
    return text if len(text) <= limit else text[:limit] + f" ... ({len(text) - limit} more characters)"


def _piece(ids: list[int], trained: bool | None, tokenizer: Any) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=False)
    return f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if trained else text


def processes(params: Any) -> int:
    return params.num_processes * params.num_machines


def steps(rows: int, params: Any) -> tuple[int, int]:
    """(steps per epoch, total steps) as transformers' Trainer will count them, all processes together."""
    per_epoch = max(1, math.ceil(rows / (params.batch_size * params.gradient_accumulation * processes(params))))
    total = params.max_steps if params.max_steps > 0 else per_epoch * params.epochs
    return per_epoch, total


def estimate(config: Any, params: Any, rows_per_microbatch: int, longest: int, kind: str) -> tuple[Any, str, int]:
    """(MemoryEstimate, device, free bytes) for a micro-batch of rows x longest tokens: the dry run's figure,
    which a real run logs too (run._report_memory)."""
    from tunelab.memory import available_memory, estimate_memory

    memory = estimate_memory(config, params, rows_per_microbatch * longest, longest, kind=kind)
    device, free = available_memory()
    return memory, device, free


def plan(params: Any) -> RunPlan:
    """The plan of the run `params` describe (LLM or text classification); raises TunelabError as a run would."""
    from tunelab.config.text_classification import TextClassificationParams

    if isinstance(params, TextClassificationParams):
        return _plan_classification(params)
    return _plan_llm(params)


def _plan_llm(params: Any) -> RunPlan:
    from tunelab.run import prepare

    prep = prepare(params)
    data, stats, tokenizer = prep.data, prep.stats, prep.tokenizer
    pairs = prep.method.data == "pairs"
    skipped = getattr(data, "skipped_rows", {})
    splits = []
    for name, examples, rows in (("train", data.train, prep.train_rows), ("valid", data.valid, prep.valid_rows)):
        if examples is None:
            continue
        summary = SplitSummary(name, data.origins[name], len(examples), len(rows or []), [len(e) for e in examples])
        if skipped.get(name):
            summary.notes.append(f"{skipped[name]} bad rows skipped (bad_rows=skip)")
        splits.append(summary)
    train = splits[0]
    if pairs:
        s = data.stats
        train.notes.append(
            f"{s.prompts_truncated} prompts cut to max_prompt_length={params.max_prompt_length}, "
            f"{s.completions_truncated} answers cut to fit, "
            f"{s.dropped_no_room} pairs dropped with no room for an answer"
        )
    else:
        train.notes.append(
            f"{stats.truncated} truncated to block_size={params.block_size}, "
            f"{stats.dropped} dropped with nothing to learn (no answer tokens left)"
        )
    train.notes += stats.notes

    examples = []
    for item in data.train[:2]:
        if pairs:
            prompt = tokenizer.decode(item.prompt_ids, skip_special_tokens=False)
            chosen = tokenizer.decode(item.chosen_ids, skip_special_tokens=False)
            rejected = tokenizer.decode(item.rejected_ids, skip_special_tokens=False)
            examples.append(
                f"{prompt}{TRAINED_OPEN}{chosen}{TRAINED_CLOSE}\n  rejected: {TRAINED_OPEN}{rejected}{TRAINED_CLOSE}"
            )
        else:
            examples.append(marked_text(item.input_ids, item.labels, tokenizer))

    rows_per_microbatch, longest = microbatch(prep)
    result = _new_plan(f"llm {params.trainer}", params, splits, examples, len(prep.train_rows), prep.resume_from)
    _add_memory(result, prep.source, params, rows_per_microbatch, longest, prep.method.model_kind)
    return result


def microbatch(prep: Any) -> tuple[int, int]:
    """(rows per micro-batch, longest row in tokens) of an LLM run: what its peak memory depends on."""
    from tunelab.data.packing import row_length

    pairs = prep.method.data == "pairs"
    longest = max((len(r) if pairs else row_length(r)) for r in prep.train_rows)
    return prep.params.batch_size * (2 if pairs else 1), longest  # a pair batch holds chosen and rejected rows


def _plan_classification(params: Any) -> RunPlan:
    from tunelab.classify import prepare

    prep = prepare(params)
    data = prep.data
    splits = []
    for name, rows in (("train", data.train), ("valid", data.valid)):
        if rows is None:
            continue
        summary = SplitSummary(name, data.origins[name], len(rows), len(rows), [len(r["input_ids"]) for r in rows])
        counts = data.counts.get(name, {})
        summary.notes.append("labels: " + ", ".join(f"{label} {counts.get(label, 0)}" for label in data.labels))
        summary.notes.append(f"{data.truncated.get(name, 0)} truncated to max_seq_length={params.max_seq_length}")
        splits.append(summary)
    examples = [prep.tokenizer.decode(r["input_ids"], skip_special_tokens=False) for r in data.train[:2]]
    examples = [
        f"{text[:700]}\n  -> label {data.labels[r['labels']]}" for text, r in zip(examples, data.train, strict=False)
    ]
    result = _new_plan("text classification", params, splits, examples, len(data.train), prep.resume_from)
    longest = max(len(r["input_ids"]) for r in data.train)
    _add_memory(result, prep.source, params, params.batch_size, longest, "classifier")
    return result


def _new_plan(
    task: str, params: Any, splits: list[SplitSummary], examples: list[str], rows: int, resume_from: Any
) -> RunPlan:
    """A plan with the parts every task counts the same way: the steps, the effective batch, LoRA or not, and the
    checkpoint the run would resume from."""
    per_epoch, total = steps(rows, params)
    plan = RunPlan(
        task=task + (" (LoRA)" if params.peft else " (full fine-tuning)"),
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


def _add_memory(result: RunPlan, source: Any, params: Any, rows: int, longest: int, kind: str) -> None:
    if processes(params) > 1:
        backend = params.distributed_backend or "ddp"
        result.notes.append(
            f"would launch {processes(params)} processes ({backend}) through accelerate; the memory below is per "
            "process without sharding (fsdp/deepspeed divide weights, gradients and optimizer states among them)"
        )
    try:
        from tunelab.models import load_config

        result.memory, result.device, result.available = estimate(load_config(source), params, rows, longest, kind)
    except (OSError, ValueError, KeyError) as err:  # a config transformers cannot read: the plan still stands
        result.notes.append(f"memory: not estimated ({type(err).__name__}: {err})")
