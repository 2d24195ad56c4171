"""A text-classification job's results on its page: accuracy and macro F1, each class's precision, recall, F1 and
support, and the confusion matrix (rows: the true label, columns: the predicted one), from the run's
eval_report.json (the last evaluation on the validation data), and the label counts of each split.
"""

from __future__ import annotations

import json
from typing import Any

from tunelab.app.params import is_classifier
from tunelab.app.worker import run_folder
from tunelab.outputs import read_run


def classification_results(job: dict[str, Any]) -> dict[str, Any] | None:
    """The final evaluation of a finished classifier, or None (another task, or no validation data)."""
    if not is_classifier(job["params"]):
        return None
    folder = run_folder(job)
    try:
        report = json.loads((folder / "eval_report.json").read_text(encoding="utf-8"))["final"]
    except (OSError, ValueError, KeyError):
        return None
    run = read_run(folder)
    labels = report["labels"]
    matrix = report["confusion_matrix"]
    largest = max((max(row) for row in matrix), default=0) or 1
    return {
        "accuracy": report["accuracy"],
        "macro_f1": report["macro_f1"],
        "labels": labels,
        "per_class": [{"label": label, **report["per_class"][label]} for label in labels],
        # each cell with its share of the largest cell, for the page's shading
        "matrix": [[{"count": n, "shade": round(n / largest, 3)} for n in row] for row in matrix],
        "label_counts": run.get("label_counts", {}),
    }
