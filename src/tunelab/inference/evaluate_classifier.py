"""`tunelab evaluate` on a text-classification run: how its predictions match a labelled split.

The split is read with the run's own columns (text_column, target_column) and bad-row rule, and the texts are cut
where training cut them (max_seq_length). The report holds accuracy, macro F1, per-class precision / recall / F1,
the confusion matrix (also as a picture) and the majority-label floor a classifier must beat, in evaluation/ of the
run folder and its model card, as `tunelab evaluate` writes them for a language model. A run trained with
valid_size, given its own data and `--split valid`, is measured on the texts it held out, drawn per label again
(data/holdout.saved_hold_out).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from tunelab.data.holdout import SavedHoldOut
from tunelab.errors import DataError
from tunelab.inference.report import publish_report
from tunelab.outputs import training_params

log = logging.getLogger("tunelab")


def evaluate_classifier(
    folder: Path, data_path: str, split: str, max_rows: int | None = None, held: SavedHoldOut | None = None
) -> dict[str, Any]:
    """Predict every row of `split` (or the first `max_rows`), compare with its labels, and publish the report.
    `held`: the run's own hold-out (data/holdout.saved_hold_out): only its examples of `split`, drawn per label as
    training drew them."""
    from tunelab.data.classification import read_labelled
    from tunelab.data.sources import read_splits
    from tunelab.inference.predict import load_classifier
    from tunelab.metrics import draw_confusion_matrix

    saved = training_params(folder)
    text_column, target_column = saved.get("text_column", "text"), saved.get("target_column", "target")
    data = read_splits(data_path, split, None)["train"]
    texts, names, _ = read_labelled(data, text_column, target_column, saved.get("bad_rows", "error"))
    origin = data.origin
    if held is not None:
        picked, origin = held.pick(len(texts), data.origin, names)
        texts, names = [texts[i] for i in picked], [names[i] for i in picked]
    texts, names = texts[:max_rows], names[:max_rows]
    if not texts:
        raise DataError(f"{origin}: no rows to evaluate")
    model, tokenizer = load_classifier(folder)
    started = time.time()
    report = labelled_report(model, tokenizer, texts, names, data.origin, target_column)
    results = {
        "data": origin,
        "rows": len(texts),
        "model": str(folder),
        **report,
        "majority_baseline": round(report["majority_baseline"], 4),
        "seconds": round(time.time() - started, 1),
    }
    card = [f"On `{origin}` ({len(texts)} rows):", "", *_numbers(results)]

    def pictures(staging: Path) -> None:
        draw_confusion_matrix(report["confusion_matrix"], report["labels"], staging / "confusion_matrix.png")

    publish_report(folder, results, _markdown(results), card, pictures)
    return results


def labelled_report(
    model: Any, tokenizer: Any, texts: list[str], names: list[str], origin: str, column: str
) -> dict[str, Any]:
    """classification_report of the classifier's predictions for `texts` against their label `names`, with the
    majority-label floor (`majority_baseline`, unrounded); a label the model does not have is a DataError naming
    the file (`origin`) and `column` the labels came from."""
    import numpy as np

    from tunelab.inference.predict import probabilities
    from tunelab.metrics import classification_report, majority_baseline

    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    unknown = sorted(set(names) - set(labels))
    if unknown:
        raise DataError(
            f"{origin}: label(s) {', '.join(map(repr, unknown[:5]))} in column {column!r} are not among the model's "
            f"({', '.join(map(repr, labels))}): it cannot predict them"
        )
    probs = probabilities(model, tokenizer, texts, batch_size=32)
    scores = np.array([[p[label] for label in labels] for p in probs])
    truth = [labels.index(name) for name in names]
    return {**classification_report(scores, truth, labels), "majority_baseline": majority_baseline(truth)}


def _numbers(results: dict[str, Any]) -> list[str]:
    return [
        "| accuracy | macro F1 | majority label |",
        "| --- | --- | --- |",
        f"| {results['accuracy']:.4f} | {results['macro_f1']:.4f} | {results['majority_baseline']:.4f} |",
    ]


def _markdown(results: dict[str, Any]) -> str:
    lines = ["# Evaluation", "", f"Data: `{results['data']}`, {results['rows']} rows.", "", *_numbers(results), ""]
    lines += ["| label | precision | recall | F1 | support |", "| --- | --- | --- | --- | --- |"]
    for label, row in results["per_class"].items():
        lines.append(
            f"| {label} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} | {row['support']} |"
        )
    lines += ["", "![confusion matrix: rows are true labels, columns predictions](confusion_matrix.png)", ""]
    return "\n".join(lines)
