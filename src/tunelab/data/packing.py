"""Packing examples into rows and collating batches without padding.

Batches are padding-free: the rows of a batch are laid end to end in one sequence of shape (1, total_tokens) with
position ids that restart at 0 for every example. transformers turns such position ids into a block-diagonal
causal mask (SDPA/eager, `masking_utils.find_packed_sequence_indices`) or varlen kernels (flash attention), so no
token attends to another example and no compute is spent on pad tokens.
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


class PaddingFreeCollator:
    """Collate rows (each a list of examples, or one example) into one padding-free sequence."""

    def __call__(self, rows: list[Any]) -> dict[str, torch.Tensor]:
        input_ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for row in rows:
            for example in row if isinstance(row, list) else [row]:
                input_ids += example.input_ids
                labels += example.labels
                positions += range(len(example.input_ids))
        return {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
        }


def count_trained(rows: list[Any]) -> int:
    """Tokens that carry a loss in a list of rows."""
    return sum(
        sum(label != IGNORE for label in example.labels)
        for row in rows
        for example in (row if isinstance(row, list) else [row])
    )
