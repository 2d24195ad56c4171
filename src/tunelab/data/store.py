"""Tokenized examples on disk: a few flat arrays, memory-mapped, so a million examples cost no Python objects.

A `TokenTable` holds one split's examples end to end: `ids` (int32 token ids), `trained` (uint8, 1 where the token
carries a loss: the label is the token itself, else -100), and per example its `lengths` and `trained_heads` (the
trained tokens among its first `window` tokens: the block_size it is written for, the block it is cut to).
`TableWriter` appends batches to raw files and returns the table; the big arrays are opened as read-only memory
maps, the small per-example ones read whole. `table[i]` is one example as an `Encoded`, built when asked for: the
rows a Trainer reads are views onto the table (data/rows.py), so memory does not grow with the number of examples.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.data.tokenize import IGNORE, Encoded

BIG = {"ids": np.int32, "trained": np.uint8}  # one value per token, memory-mapped
SMALL = {"lengths": np.int32, "trained_heads": np.int32}  # one value per example, read whole


class Items(Sequence):
    """A sequence whose items are built when asked for, by `item(index)`: a slice gives a list, a negative index
    counts from the end, one out of range is an IndexError (which also ends iteration)."""

    def item(self, index: int) -> Any:
        raise NotImplementedError

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self.item(i) for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.item(int(index))


class TokenTable(Items):
    """One split's tokenized examples (see the module docstring); a sequence of `Encoded`."""

    def __init__(self, arrays: dict[str, np.ndarray], window: int, max_id: int = -1, name: str | None = None) -> None:
        self.name = name  # the split, for a table stored in files (None: held in memory)
        self.ids, self.trained = arrays["ids"], arrays["trained"]
        self.lengths, self.trained_heads = arrays["lengths"], arrays["trained_heads"]
        self.offsets = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=self.offsets[1:])
        self.window = window
        self.max_id = max_id
        self.folder: Path | None = None  # set for a table stored in files

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [start, stop) as (ids, trained): read from the files into fresh memory for a stored table (so a
        pass over all of it does not grow the memory map's resident pages), sliced for one held in memory."""
        if self.folder is None:
            return np.asarray(self.ids[start:stop]), np.asarray(self.trained[start:stop])
        out = []
        for key, dtype in BIG.items():
            path, size = self.folder / f"{self.name}.{key}", np.dtype(dtype).itemsize
            out.append(np.fromfile(path, dtype=dtype, count=stop - start, offset=start * size))
        return out[0], out[1]

    @classmethod
    def from_examples(cls, examples: Sequence[Encoded], window: int) -> TokenTable:
        """A table in memory from Encoded examples (what a caller that tokenized on its own holds)."""
        writer = TableWriter(None, window)
        for example in examples:
            ids = np.asarray(example.input_ids, dtype=np.int32)
            trained = np.asarray(example.labels, dtype=np.int64) != IGNORE
            writer.add(ids, trained.astype(np.uint8), np.array([len(ids)], dtype=np.int32))
        return writer.finish()

    @classmethod
    def open(cls, folder: Path, name: str) -> TokenTable:
        meta = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
        arrays: dict[str, np.ndarray] = {}
        for key, dtype in {**BIG, **SMALL}.items():
            count = meta["counts"][key]
            path = folder / f"{name}.{key}"
            if count == 0:
                arrays[key] = np.zeros(0, dtype=dtype)
            elif key in BIG:
                arrays[key] = np.memmap(path, dtype=dtype, mode="r", shape=(count,))
            else:
                arrays[key] = np.fromfile(path, dtype=dtype, count=count)
        table = cls(arrays, meta["window"], meta["max_id"], name)
        table.folder = folder
        return table

    def __len__(self) -> int:
        return len(self.lengths)

    def item(self, index: int) -> Encoded:
        return self.example(index)

    def __iter__(self) -> Iterator[Encoded]:
        return (self.example(i) for i in range(len(self)))

    def example(self, index: int, limit: int | None = None) -> Encoded:
        """Example `index`, cut to its first `limit` tokens when given."""
        start = int(self.offsets[index])
        stop = int(self.offsets[index + 1]) if limit is None else min(int(self.offsets[index + 1]), start + limit)
        ids = np.asarray(self.ids[start:stop])
        labels = np.where(np.asarray(self.trained[start:stop]) != 0, ids, IGNORE)
        return Encoded(ids.tolist(), labels.tolist())

    @property
    def tokens(self) -> int:
        return int(self.offsets[-1])


class TableWriter:
    """Batches of tokenized examples appended to `<folder>/<name>.*` (or kept in memory when folder is None)."""

    def __init__(self, folder: Path | None, window: int, name: str = "train") -> None:
        self.folder, self.name, self.window = folder, name, window
        self.max_id = -1
        self.counts = dict.fromkeys({**BIG, **SMALL}, 0)
        self.parts: dict[str, list[np.ndarray]] = {key: [] for key in {**BIG, **SMALL}}
        self.files = {}
        if folder is not None:
            self.files = {key: open(folder / f"{name}.{key}", "wb") for key in {**BIG, **SMALL}}  # noqa: SIM115

    def add(self, ids: np.ndarray, trained: np.ndarray, lengths: np.ndarray) -> None:
        """One batch: its token ids and trained flags end to end, and each example's length."""
        starts = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        heads = _trained_heads(trained, starts, lengths, self.window)
        if len(ids):
            self.max_id = max(self.max_id, int(ids.max()))
        values = {"ids": ids, "trained": trained, "lengths": lengths, "trained_heads": heads}
        for key, dtype in {**BIG, **SMALL}.items():
            array = np.ascontiguousarray(values[key], dtype=dtype)
            self.counts[key] += len(array)
            if self.files:
                self.files[key].write(array.tobytes())
            else:
                self.parts[key].append(array)

    def finish(self) -> TokenTable:
        if not self.files:
            arrays = {
                key: np.concatenate(self.parts[key]) if self.parts[key] else np.zeros(0, dtype)
                for key, dtype in {**BIG, **SMALL}.items()
            }
            return TokenTable(arrays, self.window, self.max_id)
        for file in self.files.values():
            file.close()
        meta = {"counts": self.counts, "window": self.window, "max_id": self.max_id}
        (self.folder / f"{self.name}.json").write_text(json.dumps(meta), encoding="utf-8")
        return TokenTable.open(self.folder, self.name)


def copy_examples(table: TokenTable, indices: np.ndarray, writer: TableWriter, chunk: int = 8192) -> None:
    """Examples `indices` of a table (in that order, repeats allowed) appended to a writer, a chunk at a time."""
    for first in range(0, len(indices), chunk):
        picked = indices[first : first + chunk]
        low, high = int(table.offsets[picked.min()]), int(table.offsets[picked.max() + 1])
        ids, trained = table.read(low, high)
        starts, lengths = table.offsets[picked] - low, table.lengths[picked]
        ends = np.cumsum(lengths)
        positions = np.repeat(starts - (ends - lengths), lengths) + np.arange(int(ends[-1]) if len(ends) else 0)
        writer.add(ids[positions], trained[positions], lengths)


def _trained_heads(trained: np.ndarray, starts: np.ndarray, lengths: np.ndarray, window: int) -> np.ndarray:
    """Per example, its trained tokens among the first `window` (the first token never counts: it is IGNORE)."""
    if not len(lengths):
        return np.zeros(0, dtype=np.int32)
    running = np.zeros(len(trained) + 1, dtype=np.int64)
    np.cumsum(trained, out=running[1:])
    stops = starts + np.minimum(lengths, window)
    return (running[stops] - running[starts]).astype(np.int32)
