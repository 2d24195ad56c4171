"""The text-classification spine: params -> checks -> labelled data -> classifier -> Trainer -> run folder.

`tunelab text-classification`, a `task: text_classification` config and `tunelab.train(...)` with such a
config all reach `run` through the dispatcher (tasks/__init__.py); `plan` is its dry run. As for LLM runs, every
input problem is found by `prepare`, before the model loads, and the run folder appears only when complete.
The predictions of a trained run are inference/predict.py's.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import set_seed

from tunelab import outputs
from tunelab.config.text_classification import TextClassificationParams
from tunelab.data.classification import LabelledData, load_labelled_data
from tunelab.data.packing import row_length
from tunelab.env import check_machine, device_name
from tunelab.memory import log_run_estimate
from tunelab.metrics import classification_report, draw_confusion_matrix
from tunelab.models import ModelSource, check_model, load_model, load_tokenizer, resolve_model
from tunelab.models.checks import check_token_ids, fit_tokenizer
from tunelab.tasks import dry_run
from tunelab.tasks.dry_run import RunPlan, SplitSummary
from tunelab.training.checkpoints import check_disk_space, checkpoint_bytes

log = logging.getLogger("tunelab")


@dataclass
class Prepared:
    """Everything checked before the classifier loads: what a run trains and what `--dry-run` shows."""

    params: TextClassificationParams
    folder: outputs.RunFolder
    resume_from: Path | None
    source: ModelSource
    config: Any  # the model's transformers config, read before any weight loads
    tokenizer: Any
    data: LabelledData


def prepare(params: TextClassificationParams) -> Prepared:
    """Check the folder, the machine and the labelled data (read, checked, tokenized), writing nothing."""
    folder = outputs.RunFolder(params.project_name)
    folder.check_free()
    resume_from = folder.resume_point(params)
    check_machine(params)
    source = resolve_model(params.model)
    config = check_model(source, params, kind="classifier")
    tokenizer = load_tokenizer(source, params.max_seq_length)
    fit_tokenizer(tokenizer, config, source)
    data = load_labelled_data(params, tokenizer)
    highest = max((max(row["input_ids"], default=-1) for row in [*data.train, *(data.valid or [])]), default=-1)
    check_token_ids(highest, config, source)
    return Prepared(params, folder, resume_from, source, config, tokenizer, data)


def plan(params: TextClassificationParams) -> RunPlan:
    """The dry run: what `run` would do, from the same `prepare`, with the first texts and their labels."""
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
        if data.skipped_rows.get(name):
            summary.notes.append(f"{data.skipped_rows[name]} bad rows skipped (bad_rows=skip)")
        splits.append(summary)
    decode = prep.tokenizer.decode
    examples = [
        f"{decode(row['input_ids'], skip_special_tokens=False)[:700]}\n  -> label {data.labels[row['labels']]}"
        for row in data.train[:2]
    ]
    result = dry_run.new_plan("text classification", params, splits, examples, len(data.train), prep.resume_from)
    result.label_counts = {
        split: {label: data.counts[split].get(label, 0) for label in data.labels} for split in data.counts
    }
    dry_run.add_memory(result, prep.config, params, params.batch_size, _longest(data), "classifier")
    return result


def _longest(data: LabelledData) -> int:
    return max(len(row["input_ids"]) for row in data.train)


def run(params: TextClassificationParams) -> Path:
    """Train a sequence classifier end to end and return the finished run folder."""
    try:
        return _run(params)
    finally:
        outputs.release_locks()  # a failed run's too: the process may go on (the Python API, a notebook)


def _run(params: TextClassificationParams) -> Path:
    prep = prepare(params)
    folder, resume_from, tokenizer, data = prep.folder, prep.resume_from, prep.tokenizer, prep.data
    folder.data_fingerprint(params)  # hashed now, by every process, not by the main one while others wait
    _report_data(params, data)

    set_seed(params.seed)
    model = load_model(prep.source, params, kind="classifier", tokenizer=tokenizer, labels=data.labels)
    log_run_estimate(model.config, params, params.batch_size, _longest(data), "classifier")
    check_disk_space(folder.final.parent, 2 * checkpoint_bytes(model, not params.peft), "checkpoints and outputs")
    from tunelab.training.trainer import run_training  # seconds of imports that the dry run never needs

    trainer, reports = _build_trainer(model, tokenizer, params, data, folder.staging)
    staging = folder.open_for(trainer, params, resume_from)
    result = run_training(trainer, folder, resume_from)

    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    if data.valid:
        metrics.update(trainer.evaluate())
    if data.valid and trainer.is_world_process_zero():
        report = reports[-1]
        outputs.write_json(staging / "eval_report.json", {"final": report, "per_evaluation": reports})
        draw_confusion_matrix(report["confusion_matrix"], data.labels, staging / "confusion_matrix.png")
    run_info = {
        "task": "text_classification",
        "trainer": "text_classification",
        "base_model": outputs.model_reference(params.model),
        "adapter": params.peft,
        "merged": "merged" if params.peft else None,  # pipeline("text-classification") needs full weights
        "labels": data.labels,
        "label_counts": {split: dict(counts) for split, counts in data.counts.items()},
        "data": data.origins,
        "skipped_rows": data.skipped_rows,
        "device": device_name(),
        "usage": f'tunelab predict --model {Path(params.project_name).name} "a text to label"',
    }
    outputs.write_run(staging, trainer, tokenizer, params, None, metrics, run_info)
    log.info("done: %s (eval accuracy %s)", folder.final, metrics.get("eval_accuracy", "n/a"))
    return folder.close_for(trainer, params)


def _report_data(params: TextClassificationParams, data: LabelledData) -> None:
    log.info("data: %s", ", ".join(f"{k}={v}" for k, v in data.origins.items()))
    log.info("labels (%d): %s", len(data.labels), ", ".join(data.labels))
    for split, counts in data.counts.items():
        total = sum(counts.values())
        shares = ", ".join(
            f"{label} {counts.get(label, 0)} ({100 * counts.get(label, 0) / total:.0f}%)" for label in data.labels
        )
        log.info(
            "%s: %d texts: %s; %d truncated to max_seq_length=%d",
            split,
            total,
            shares,
            data.truncated[split],
            params.max_seq_length,
        )


def _build_trainer(
    model: Any, tokenizer: Any, params: TextClassificationParams, data: LabelledData, staging: Path
) -> tuple[Any, list]:
    from transformers import DataCollatorWithPadding, EarlyStoppingCallback
    from transformers.trainer_callback import PrinterCallback

    from tunelab.training.callbacks import ProgressAndMetrics
    from tunelab.training.trainer import GuardedTrainer, ListDataset, early_stopping_arguments, training_arguments

    has_valid = bool(data.valid)
    steps_per_epoch = math.ceil(len(data.train) / (params.batch_size * params.gradient_accumulation))
    early = has_valid and params.eval_strategy != "no"
    args = training_arguments(
        params,
        str(staging),
        steps_per_epoch,
        has_valid,
        # Without early stopping, checkpoints follow save_steps.
        **(early_stopping_arguments(params, steps_per_epoch) if early else {}),
        prediction_loss_only=False,  # the metrics need the logits
    )
    # One per evaluation, the final one last; a resumed run's begins with those before the resume (GuardedTrainer
    # keeps them with each checkpoint).
    reports: list[dict] = []

    def compute_metrics(prediction: Any) -> dict[str, float]:
        report = classification_report(prediction.predictions, prediction.label_ids, data.labels)
        reports.append(report)
        return {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"]}

    callbacks: list[Any] = [ProgressAndMetrics(staging / "metrics.jsonl", perplexity=False)]
    if early:
        callbacks.append(EarlyStoppingCallback(params.early_stopping_patience, params.early_stopping_threshold))
    trainer = GuardedTrainer(
        keep_checkpoints=params.save_total_limit,
        group_by_length=params.group_by_length,
        head_lr_ratio=params.head_lr_ratio,
        loraplus_lr_ratio=params.loraplus_lr_ratio if params.peft else None,
        evaluation_reports=reports,
        model=model,
        args=args,
        train_dataset=ListDataset(data.train),
        # Evaluated shortest first: batches of similar lengths, little padding (the metrics ignore the order).
        eval_dataset=ListDataset(sorted(data.valid, key=row_length)) if has_valid else None,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_metrics=compute_metrics if has_valid else None,
        callbacks=callbacks,
    )
    # The classifier's loss is a mean over the micro-batch's texts, so Trainer must divide it by the accumulation
    # steps. Its forward takes **kwargs, which makes Trainer assume the model divides by the whole accumulated
    # batch itself; transformers' classification loss does not, and the gradient would be `gradient_accumulation`
    # times too large (the logged loss too).
    trainer.model_accepts_loss_kwargs = False
    trainer.remove_callback(PrinterCallback)
    return trainer, reports
