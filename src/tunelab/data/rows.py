"""Training rows as views onto a TokenTable: which examples make a row, read from the table when a batch asks.

Three shapes, one per way a method cuts examples into rows:
- `ExampleRows`: one example per row, cut to block_size (sft);
- `PackedRows`: several examples per row (sft with packing), stored as one index array and row bounds;
- `BlockRows`: the token stream of all examples cut into block_size pieces (default / causal LM).
Each is a sequence the Trainer's dataset indexes (an `Encoded`, or a list of them for a packed row, as the
collator in data/packing.py expects) and has `lengths()` for length-grouped sampling, without touching the
tokens. Built from a few integer arrays, so a million examples cost megabytes, not gigabytes.
"""

from __future__ import annotations

import bisect
import heapq

import numpy as np

from tunelab.data.store import Items, TokenTable
from tunelab.data.tokenize import IGNORE, Encoded


class ExampleRows(Items):
    """Examples `indices` of a table, each cut to its first `limit` tokens; `whole` trains every token but the
    first (completion_only_loss off)."""

    def __init__(self, table: TokenTable, indices: np.ndarray, limit: int, whole: bool = False) -> None:
        self.table, self.indices, self.limit, self.whole = table, indices, limit, whole

    def __len__(self) -> int:
        return len(self.indices)

    def item(self, index: int) -> Encoded:
        example = self.table.example(int(self.indices[index]), self.limit)
        if self.whole:  # every token but the first, and an image's (they are the image, not text to predict)
            labels = [IGNORE, *example.input_ids[1:]]
            for span in example.images or ():
                labels[span.start : span.start + span.count] = [IGNORE] * span.count
            example = Encoded(example.input_ids, labels, example.images)
        return example

    def lengths(self) -> np.ndarray:
        return np.minimum(self.table.lengths[self.indices], self.limit)


class PackedRows(Items):
    """Rows of several examples: row r holds examples `order[starts[r]:starts[r + 1]]` (an ExampleRows view)."""

    def __init__(self, examples: ExampleRows, order: np.ndarray, starts: np.ndarray) -> None:
        self.examples, self.order, self.starts = examples, order, starts

    def __len__(self) -> int:
        return len(self.starts) - 1

    def item(self, index: int) -> list[Encoded]:
        members = self.order[self.starts[index] : self.starts[index + 1]]
        return [self.examples.item(int(i)) for i in members]

    def lengths(self) -> np.ndarray:
        return np.add.reduceat(self.examples.lengths()[self.order], self.starts[:-1]) if len(self) else np.zeros(0)


class BlockRows(Items):
    """The table's tokens end to end, cut into `count` rows of `size` tokens, every token but the first trained."""

    def __init__(self, table: TokenTable, size: int, count: int) -> None:
        self.table, self.size, self.count = table, size, count

    def __len__(self) -> int:
        return self.count

    def item(self, index: int) -> Encoded:
        block = np.asarray(self.table.ids[index * self.size : (index + 1) * self.size]).tolist()
        return Encoded(block, [IGNORE, *block[1:]])

    def lengths(self) -> np.ndarray:
        total = self.table.tokens
        return np.minimum(self.size, total - np.arange(self.count) * self.size)


def best_fit_rows(lengths: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit-decreasing packing of items of `lengths` (each <= block_size) into rows of <= block_size.

    Longest first (ties in their order), each into the row with the least room that still fits it (ties: the
    earliest row), else a new row: rows come out nearly full (TRL's `bfd` does the same). Rooms are few distinct
    numbers (at most block_size), so the rows are kept in a heap per room and the rooms in a sorted list: a
    million items pack in seconds. Returns (order, starts): row r holds items order[starts[r]:starts[r + 1]].
    """
    by_length = np.argsort(-lengths, kind="stable")
    row_of = np.empty(len(lengths), dtype=np.int64)
    rooms: list[int] = []  # distinct rooms that some row has, ascending
    rows_with: dict[int, list[int]] = {}  # room -> heap of row indices
    count = 0
    for item, size in zip(by_length.tolist(), lengths[by_length].tolist(), strict=True):
        slot = bisect.bisect_left(rooms, size)
        if slot < len(rooms):
            room = rooms[slot]
            row = heapq.heappop(rows_with[room])
            if not rows_with[room]:
                del rows_with[room]
                rooms.pop(slot)
        else:
            room, row = block_size, count
            count += 1
        row_of[item] = row
        left = room - size
        if left > 0:
            if left not in rows_with:
                rows_with[left] = []
                bisect.insort(rooms, left)
            heapq.heappush(rows_with[left], row)
    # Rows in the order they were opened, each with its items in the order they were placed (longest first).
    placed = np.empty(len(lengths), dtype=np.int64)
    placed[by_length] = np.arange(len(lengths))
    order = np.lexsort((placed, row_of))
    starts = np.searchsorted(row_of[order], np.arange(count + 1))
    return order, starts
