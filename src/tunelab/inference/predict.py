"""Labelling texts with a trained text-classification run (`tunelab predict`).

The run folder holds a full sequence classifier (or, after LoRA training, an adapter plus `merged/`, the full
model); its config carries the label names, so predictions come out as names.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.inference.device import to_inference_device
from tunelab.outputs import beside_data, training_params, written_whole


def load_classifier(path: str | Path) -> tuple[Any, Any]:
    """(model, tokenizer) from a text-classification run folder (its merged/ copy after LoRA training); the
    tokenizer's model_max_length is the run's max_seq_length."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = Path(path)
    if (folder / "merged" / "config.json").is_file():
        folder = folder / "merged"
    if not (folder / "config.json").is_file():
        raise TunelabError(f"{path} holds no classifier: expected a tunelab text-classification run folder")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if not any(name.endswith("ForSequenceClassification") for name in config.get("architectures") or []):
        raise TunelabError(f"{path} is not a text classifier (architectures: {config.get('architectures')})")
    model = to_inference_device(AutoModelForSequenceClassification.from_pretrained(folder))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    saved = training_params(path) or training_params(Path(path).parent)  # a run folder, or its merged/
    trained_length = saved.get("max_seq_length")
    # Texts are cut where training cut them; a folder that does not say keeps 512 tokens at most.
    if isinstance(trained_length, int) and trained_length > 0:
        tokenizer.model_max_length = trained_length
    else:
        tokenizer.model_max_length = min(tokenizer.model_max_length, 512)
    return model, tokenizer


def predict(model: Any, tokenizer: Any, texts: list[str], batch_size: int = 16) -> list[tuple[str, float]]:
    """(label name, probability) of the most likely label for each text."""
    return [(max(p, key=p.get), max(p.values())) for p in probabilities(model, tokenizer, texts, batch_size)]


def probabilities(model: Any, tokenizer: Any, texts: list[str], batch_size: int = 16) -> list[dict[str, float]]:
    """Every label's probability for each text, cut where training cut it (load_classifier), else at 512 tokens."""
    import torch

    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    max_length = tokenizer.model_max_length if tokenizer.model_max_length < 10**6 else 512
    out = []
    for start in range(0, len(texts), batch_size):
        # Cut as training cut (data/classification.py): the tokens with their special ones, then the first
        # max_length (a BERT-style text loses its closing [SEP] there, as it did in training).
        ids = tokenizer(texts[start : start + batch_size], add_special_tokens=True, verbose=False)["input_ids"]
        batch = tokenizer.pad({"input_ids": [row[:max_length] for row in ids]}, return_tensors="pt").to(model.device)
        with torch.no_grad():
            probs = model(**batch).logits.float().softmax(-1).tolist()
        out += [dict(zip(names, row, strict=True)) for row in probs]
    return out


def predictions_path(data: Path, output: str | None) -> Path:
    """Where `write_predictions` writes (checked before the model loads): `output`, or `<data>.predictions.csv`."""
    return beside_data(data, output, ".predictions.csv", "predict", "CSV file")


def write_predictions(model: Any, tokenizer: Any, texts: list[str], text_column: str, target: Path) -> Path:
    """Label the texts (a data file's column, formats.read_texts); write a CSV with each text, its label, the
    label's score and every probability, to `target` (predictions_path), whole or not at all."""
    probs = probabilities(model, tokenizer, texts)
    names = list(probs[0]) if probs else []
    with written_whole(target, "predict", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([text_column, "label", "score", *[f"p_{name}" for name in names]])
        for text, p in zip(texts, probs, strict=True):
            label = max(p, key=p.get)
            writer.writerow([text, label, f"{p[label]:.4f}", *[f"{p[name]:.4f}" for name in names]])
    return target
