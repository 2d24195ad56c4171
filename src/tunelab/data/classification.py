"""Labelled texts -> token ids and label ids, every problem found before training.

Labels may be names ("positive") or integers (0, 1, 2); the label set is taken from the train split, in sorted
order (numbers numerically), and saved with the model (id2label / label2id) so predictions come out as names.
Empty or missing texts and missing labels are errors naming their rows (a classifier cannot learn from them,
and silently dropping them would hide a broken export) unless bad_rows=skip asks for them to be dropped and
counted; a single label, and labels in the valid split that the train split never shows, are always errors.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tunelab.config.text_classification import TextClassificationParams
from tunelab.data.formats import MAX_LISTED, RowProblem, cell_text, convert_rows, describe_type
from tunelab.data.holdout import described, held_out_count, stratified_indices
from tunelab.data.sources import Split, read_splits
from tunelab.errors import DataError

log = logging.getLogger("tunelab")


@dataclass
class LabelledData:
    train: list[dict[str, Any]]  # {"input_ids": [...], "labels": int}
    valid: list[dict[str, Any]] | None
    labels: list[str]
    counts: dict[str, Counter] = field(default_factory=dict)
    truncated: dict[str, int] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)
    skipped_rows: dict[str, int] = field(default_factory=dict)  # split -> bad rows dropped (bad_rows=skip)


def _label_name(value: Any) -> str | None:
    """A label as text: names as they are, whole numbers without '.0', JSON's true/false as "true"/"false" (as a
    CSV of the same data spells them); None when missing (None, NaN, empty)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def _labelled_row(row: dict, text_column: str, target_column: str) -> tuple[str, str]:
    text = cell_text(row, text_column)
    value = row.get(target_column)
    if isinstance(value, (dict, list, bytes)):
        raise RowProblem(target_column, f"expected a label name or number, got {describe_type(value)}")
    label = _label_name(value)
    if label is None:
        raise RowProblem(target_column, "missing label")
    return text, label


def _sort_key(name: str) -> tuple[int, float, str]:
    """Numbers first, numerically, then names; the name itself breaks ties ("1" and "1.0", or "nan", which compares
    unequal to everything), so the order never falls back on a set's iteration order, which differs between
    processes (PYTHONHASHSEED) and would give a resumed run or another rank other label ids."""
    try:
        number = float(name)
    except ValueError:
        return (1, 0.0, name)
    return (0, number, name) if math.isfinite(number) else (1, 0.0, name)


def label_order(labels: list[str]) -> list[str]:
    """The label names of a split in id order: sorted (numbers numerically), the same in every process."""
    return sorted(set(labels), key=_sort_key)


def read_labelled(
    split: Split, text_column: str, target_column: str, bad_rows: str = "error"
) -> tuple[list[str], list[str], int]:
    """(texts, label names, rows skipped) of a split; bad rows are collected into one DataError (or skipped and
    counted, bad_rows=skip)."""
    for column in (text_column, target_column):
        if column not in split.columns:
            flag = "text_column" if column == text_column else "target_column"
            raise DataError(
                f"{split.origin}: column {column!r} not found (columns: {', '.join(split.columns[:20])}); "
                f"set {flag} (data.column_mapping.{flag})"
            )
    pairs, skipped = convert_rows(split, lambda row: _labelled_row(row, text_column, target_column), bad_rows)
    return [text for text, _ in pairs], [label for _, label in pairs], skipped


def load_labelled_data(params: TextClassificationParams, tokenizer: Any) -> LabelledData:
    """Read, check and tokenize the train (and valid) splits of a text-classification run."""
    splits = read_splits(params.data_path, params.train_split, params.valid_split)
    read = {}
    skipped = {}
    for name, split in splits.items():
        *read[name], skipped[name] = read_labelled(split, params.text_column, params.target_column, params.bad_rows)
    names = label_order(read["train"][1])
    if len(names) < 2:
        raise DataError(
            f"{splits['train'].origin}: only one label ({names[0]!r}) in column {params.target_column!r}: "
            "a classifier needs at least two"
        )
    index = {name: i for i, name in enumerate(names)}
    origins = {n: s.origin for n, s in splits.items()}
    if params.valid_size is not None:  # drawn per label, before tokenizing: the splits are then counted alike
        texts, labels = read["train"]
        count = held_out_count(params.valid_size, len(texts), origins["train"])
        kept, held = stratified_indices(labels, count, params.seed)
        if not len(held):
            raise DataError(
                f"{origins['train']}: valid_size cannot hold an example out: no label has two examples (one must "
                "stay to be trained on); give a validation split of its own (valid_split)"
            )
        read["train"] = [texts[i] for i in kept], [labels[i] for i in kept]
        read["valid"] = [texts[i] for i in held], [labels[i] for i in held]
        origins["valid"] = described(len(held), len(texts), origins["train"], params.valid_size, params.seed)
        skipped["valid"] = 0
    data = LabelledData(train=[], valid=None, labels=names, origins=origins, skipped_rows=skipped)
    for name, (texts, labels) in read.items():
        unseen = sorted(set(labels) - set(index), key=_sort_key)
        if unseen:
            raise DataError(
                f"{origins[name]}: label(s) {', '.join(map(repr, unseen[:MAX_LISTED]))} never appear in the "
                f"train split ({', '.join(map(repr, names))}): the model could not learn them"
            )
        enc = tokenizer(texts, truncation=False, add_special_tokens=True)["input_ids"]
        data.truncated[name] = sum(len(ids) > params.max_seq_length for ids in enc)
        rows = [
            {"input_ids": list(ids[: params.max_seq_length]), "labels": index[label]}
            for ids, label in zip(enc, labels, strict=True)
        ]
        data.counts[name] = Counter(labels)
        if name == "train":
            data.train = rows
        else:
            data.valid = rows
            missing = [label for label in names if label not in data.counts[name]]
            if missing:
                log.warning(
                    "%s has no example of label(s) %s: their precision/recall cannot be measured",
                    origins[name],
                    ", ".join(map(repr, missing)),
                )
    return data
