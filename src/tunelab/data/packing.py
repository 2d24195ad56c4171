"""Packing examples into rows, and collating rows into batches where no token attends to another example.

Position ids restart at 0 for every example. With no attention mask passed, transformers turns such position ids
into a block-diagonal causal mask (SDPA/eager, `masking_utils.find_packed_sequence_indices`) or into varlen
kernel calls (flash attention), so packed examples stay independent without a hand-made mask.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tunelab.data.rows import best_fit_rows
from tunelab.data.tokenize import IGNORE, Encoded


def pack(examples: list[Encoded], block_size: int) -> list[list[Encoded]]:
    """Examples (each <= block_size tokens) packed best-fit-decreasing into rows of <= block_size tokens, as the
    sft method packs (data/rows.best_fit_rows); row order does not matter, the sampler shuffles rows."""
    order, starts = best_fit_rows(np.array([len(e) for e in examples], dtype=np.int64), block_size)
    return [[examples[i] for i in order[starts[r] : starts[r + 1]]] for r in range(len(starts) - 1)]


class PackedRowsCollator:
    """Collate rows (each one example, or a list of examples packed together) with per-example position ids.

    Two layouts, both without attention across examples:
    - `flat=True` (flash-attention varlen kernels): every example end to end in one (1, total_tokens) sequence,
      no padding at all;
    - `flat=False` (SDPA / eager): a (batch, longest_row) tensor; the padding of a row is one more pseudo-example
      (positions restarting at 0, labels -100), so the block-diagonal mask that transformers builds from the
      position ids keeps it apart too. Attention then costs batch x longest_row^2, not (batch x longest_row)^2.
      When no row is packed, position ids are left out: with padding only at the end of a row, plain causal
      attention is already exact (no real token can see a later pad), and SDPA then runs its fused causal
      kernel instead of materialising a mask and the attention weights.
    """

    def __init__(
        self,
        pad_token_id: int,
        flat: bool = False,
        pad_to_multiple_of: int = 8,
        mark_tokens: bool = False,
        images: Any = None,
    ) -> None:
        self.pad_token_id = pad_token_id
        self.flat = flat
        self.multiple = pad_to_multiple_of
        self.mark_tokens = mark_tokens  # a "token_mask" too, 1 on real tokens (not for the model: for its loss)
        self.images = images  # a vision-language model's data/images.ImageCodec: each batch's pixels added

    def __call__(self, rows: list[Any]) -> dict[str, torch.Tensor]:
        built = [_row(row) for row in rows]
        if self.flat:
            built = [tuple(sum((part[i] for part in built), []) for i in range(3))]
        width = max(len(ids) for ids, _, _ in built)
        if not self.flat:
            width = -(-width // self.multiple) * self.multiple
        input_ids, labels, positions = [], [], []
        for ids, labs, pos in built:
            pad = width - len(ids)
            input_ids.append(ids + [self.pad_token_id] * pad)
            labels.append(labs + [IGNORE] * pad)
            positions.append(pos + list(range(pad)))
        batch = {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
        }
        if self.flat or any(len(examples_in(row)) > 1 for row in rows):
            batch["position_ids"] = torch.tensor(positions, dtype=torch.long)
        if self.mark_tokens:
            batch["token_mask"] = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _, _ in built])
        if self.images is not None:
            shown = [[span.ref for example in examples_in(row) for span in example.images or ()] for row in rows]
            batch.update(self.images.batch_inputs(shown, batch["input_ids"]))
        return batch


def examples_in(row: Any) -> list[Encoded]:
    """The examples of a row: a packed row is a list of them, an unpacked row is one."""
    return row if isinstance(row, list) else [row]


def row_length(row: Any) -> int:
    if isinstance(row, dict):  # a labelled text (data/classification.py): its token ids
        return len(row["input_ids"])
    return sum(len(example) for example in examples_in(row))


def row_lengths(rows: Any) -> list[int]:
    """Every row's length: read from a view's stored lengths (data/rows.py), else measured row by row."""
    if hasattr(rows, "lengths"):
        return rows.lengths().tolist()
    return [row_length(row) for row in rows]


def _row(row: Any) -> tuple[list[int], list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for example in examples_in(row):
        ids += example.input_ids
        labels += example.labels
        positions += range(len(example.input_ids))
    return ids, labels, positions
