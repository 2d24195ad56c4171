"""Packing examples into rows, and collating rows into batches where no token attends to another example.

Position ids restart at 0 for every example. With no attention mask passed, transformers turns such position ids
into a block-diagonal causal mask (SDPA/eager, `masking_utils.find_packed_sequence_indices`) or into varlen
kernel calls (flash attention), so packed examples stay independent without a hand-made mask.
"""

from __future__ import annotations

from typing import Any

import torch

from tunelab.data.tokenize import IGNORE, Encoded


def pack(examples: list[Encoded], block_size: int) -> list[list[Encoded]]:
    """Greedy first-fit packing, in order, of examples (each <= block_size) into rows of <= block_size tokens."""
    rows: list[list[Encoded]] = []
    room: list[int] = []
    for example in examples:
        size = len(example)
        # Look at the last few open rows only: keeps packing linear on large data and order roughly kept.
        for i in range(max(0, len(rows) - 8), len(rows)):
            if room[i] >= size:
                rows[i].append(example)
                room[i] -= size
                break
        else:
            rows.append([example])
            room.append(block_size - size)
    return rows


class PackedRowsCollator:
    """Collate rows (each one example, or a list of examples packed together) with per-example position ids.

    Two layouts, both without attention across examples:
    - `flat=True` (flash-attention varlen kernels): every example end to end in one (1, total_tokens) sequence,
      no padding at all;
    - `flat=False` (SDPA / eager): a (batch, longest_row) tensor; the padding of a row is one more pseudo-example
      (positions restarting at 0, labels -100), so the block-diagonal mask that transformers builds from the
      position ids keeps it apart too. Attention then costs batch x longest_row^2, not (batch x longest_row)^2.
    """

    def __init__(self, pad_token_id: int, flat: bool = False, pad_to_multiple_of: int = 8) -> None:
        self.pad_token_id = pad_token_id
        self.flat = flat
        self.multiple = pad_to_multiple_of

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
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": torch.tensor(positions, dtype=torch.long),
        }


def _row(row: Any) -> tuple[list[int], list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for example in row if isinstance(row, list) else [row]:
        ids += example.input_ids
        labels += example.labels
        positions += range(len(example.input_ids))
    return ids, labels, positions


def count_trained(rows: list[Any]) -> int:
    """Tokens that carry a loss in a list of rows."""
    return sum(
        sum(label != IGNORE for label in example.labels)
        for row in rows
        for example in (row if isinstance(row, list) else [row])
    )
