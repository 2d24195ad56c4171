"""Classification metrics (accuracy, macro F1, per-class precision/recall, confusion matrix), and the pictures of
reports (confusion matrix, loss curves).

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


CURVE_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")


def draw_curves(
    curves: dict[str, list[tuple[float, float]]], path: Path, title: str, x_label: str, y_label: str
) -> None:
    """A PNG line chart of named (x, y) series (e.g. training and eval loss by step), with axes and a legend."""
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 720, 420, 70, 20, 40, 50
    points = [p for series in curves.values() for p in series]
    x_min, x_max = min(p[0] for p in points), max(p[0] for p in points)
    y_min, y_max = min(p[1] for p in points), max(p[1] for p in points)
    x_span, y_span = (x_max - x_min) or 1.0, (y_max - y_min) or 1.0

    def place(x: float, y: float) -> tuple[float, float]:
        return (
            left + (x - x_min) / x_span * (width - left - right),
            height - bottom - (y - y_min) / y_span * (height - top - bottom),
        )

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 12), title, fill="black")
    draw.line([(left, top), (left, height - bottom), (width - right, height - bottom)], fill="black")
    for i in range(5):  # axis ticks: five values on each axis
        y = y_min + y_span * i / 4
        draw.text((6, place(x_min, y)[1] - 6), f"{y:.3g}", fill="black")
        x = x_min + x_span * i / 4
        draw.text((place(x, y_min)[0] - 10, height - bottom + 6), f"{x:.4g}", fill="black")
    draw.text((width // 2, height - 20), x_label, fill="black")
    draw.text((6, top - 20), y_label, fill="black")
    for number, (name, series) in enumerate(curves.items()):
        colour = CURVE_COLOURS[number % len(CURVE_COLOURS)]
        placed = [place(x, y) for x, y in sorted(series)]
        if len(placed) > 1:
            draw.line(placed, fill=colour, width=2)
        for x, y in placed:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        draw.text((width - right - 140, top + 16 * number), f"- {name}", fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
