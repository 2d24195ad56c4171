"""Classification metrics (accuracy, macro F1, per-class precision/recall, confusion matrix) and its picture.

Plain numpy and Pillow: no scikit-learn or matplotlib needed for a report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def classification_report(logits: Any, label_ids: Any, labels: list[str]) -> dict[str, Any]:
    """Everything about how predictions (argmax of logits) match the true labels, as plain JSON values.

    confusion_matrix[i][j] counts texts of true label i predicted as j.
    """
    if isinstance(logits, tuple):  # a model output with more than logits: the logits come first
        logits = logits[0]
    predicted = np.asarray(logits).argmax(-1)
    truth = np.asarray(label_ids)
    n = len(labels)
    matrix = np.zeros((n, n), dtype=int)
    np.add.at(matrix, (truth, predicted), 1)
    per_class = {}
    f1s = []
    for i, label in enumerate(labels):
        tp = matrix[i, i]
        predicted_i, actual_i = matrix[:, i].sum(), matrix[i, :].sum()
        precision = tp / predicted_i if predicted_i else 0.0
        recall = tp / actual_i if actual_i else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {
            "precision": round(float(precision), 4),
            "recall": round(float(recall), 4),
            "f1": round(float(f1), 4),
            "support": int(actual_i),
        }
        if actual_i:
            f1s.append(f1)
    return {
        "accuracy": round(float((predicted == truth).mean()) if len(truth) else 0.0, 4),
        "macro_f1": round(float(np.mean(f1s)) if f1s else 0.0, 4),
        "per_class": per_class,
        "labels": labels,
        "confusion_matrix": matrix.tolist(),
    }


def majority_baseline(label_ids: Any) -> float:
    """Accuracy of always predicting the most frequent label: the floor a classifier must beat."""
    counts = np.bincount(np.asarray(label_ids))
    return float(counts.max() / counts.sum())


def draw_confusion_matrix(matrix: list[list[int]], labels: list[str], path: Path) -> None:
    """A PNG of the confusion matrix: rows are true labels, columns predictions, shade = share of the row."""
    from PIL import Image, ImageDraw

    n = len(labels)
    cell, margin = 64, 120
    size = (margin + n * cell + 20, margin + n * cell + 20)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((margin, 8), "predicted ->", fill="black")
    draw.text((8, margin - 20), "true", fill="black")
    for i, label in enumerate(labels):
        draw.text((margin + i * cell + 4, margin - 20), label[:10], fill="black")
        draw.text((8, margin + i * cell + cell // 2 - 6), label[:16], fill="black")
    for i, row in enumerate(matrix):
        total = max(sum(row), 1)
        for j, count in enumerate(row):
            share = count / total
            shade = int(255 - 200 * share)
            box = (margin + j * cell, margin + i * cell, margin + (j + 1) * cell, margin + (i + 1) * cell)
            draw.rectangle(box, fill=(shade, shade, 255), outline="gray")
            draw.text((box[0] + 6, box[1] + cell // 2 - 6), str(count), fill="black" if share < 0.6 else "white")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
