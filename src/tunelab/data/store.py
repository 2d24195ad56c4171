"""Tokenized examples on disk: a few flat arrays, memory-mapped, so a million examples cost no Python objects.

A `TokenTable` holds one split's examples end to end: `ids` (int32 token ids), `trained` (uint8, 1 where the token
carries a loss: the label is the token itself, else -100), and per example its `lengths` and `trained_heads` (the
trained tokens among its first `window` tokens: the block_size it is written for, the block it is cut to). Examples
that show images (a vision-language model's) keep where each image is and the tokens it takes in `images`
(`<name>.images.json`), one entry per example, null for one without.
`TableWriter` appends batches to raw files and returns the table; the big arrays are opened as read-only memory
maps, the small per-example ones read whole. `table[i]` is one example as an `Encoded`, built when asked for: the
rows a Trainer reads are views onto the table (data/rows.py), so memory does not grow with the number of examples.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.data.images import ImageSpan, images_tokens, stored_ref
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
        self.images: list[list[ImageSpan] | None] | None = None  # per example, where any example shows images

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
            images = [example.images] if example.images else None
            writer.add(ids, trained.astype(np.uint8), np.array([len(ids)], dtype=np.int32), images=images)
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
        images = folder / f"{name}.images.json"
        if images.is_file():
            listed = json.loads(images.read_text(encoding="utf-8"))
            table.images = [[_opened_span(folder, *span) for span in row] if row else None for row in listed]
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
        images = self.images[index] if self.images is not None else None
        if images:  # cut before an image the limit would split: its tokens stand or fall together
            images, kept = images_tokens(images, stop - start)
            stop = start + kept
            if self.folder is not None:  # image bytes the table keeps: named relative to its folder
                images = [replace(s, ref=str(self.folder / s.ref)) if _kept(s.ref) else s for s in images]
        ids = np.asarray(self.ids[start:stop])
        labels = np.where(np.asarray(self.trained[start:stop]) != 0, ids, IGNORE)
        return Encoded(ids.tolist(), labels.tolist(), images or None)

    @property
    def tokens(self) -> int:
        return int(self.offsets[-1])


class TableWriter:
    """Batches of tokenized examples appended to `<folder>/<name>.*` (or kept in memory when folder is None)."""

    def __init__(self, folder: Path | None, window: int, name: str = "train") -> None:
        self.folder, self.name, self.window = folder, name, window
        self.max_id = -1
        self.images: list[list[ImageSpan] | None] = []  # per example; kept only once some example has any
        self.counts = dict.fromkeys({**BIG, **SMALL}, 0)
        self.parts: dict[str, list[np.ndarray]] = {key: [] for key in {**BIG, **SMALL}}
        self.files = {}
        if folder is not None:
            self.files = {key: open(folder / f"{name}.{key}", "wb") for key in {**BIG, **SMALL}}  # noqa: SIM115

    def add(self, ids: np.ndarray, trained: np.ndarray, lengths: np.ndarray, images: list | None = None) -> None:
        """One batch: its token ids and trained flags end to end, each example's length, and (where any shows images)
        each example's images (data/images.ImageSpan lists, None for one without)."""
        if images is not None or self.images:
            if not self.images:
                self.images = [None] * self.counts["lengths"]
            if images is not None and self.folder is not None:  # image bytes to their files now, not kept
                images = [[_bytes_stored(span, self.folder) for span in row] if row else None for row in images]
            self.images += images if images is not None else [None] * len(lengths)
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
        images = self.images if any(self.images) else None
        if not self.files:
            arrays = {
                key: np.concatenate(self.parts[key]) if self.parts[key] else np.zeros(0, dtype)
                for key, dtype in {**BIG, **SMALL}.items()
            }
            table = TokenTable(arrays, self.window, self.max_id)
            table.images = images
            return table
        for file in self.files.values():
            file.close()
        if images is not None:  # bytes become files beside the table: the listing is JSON
            listed = [[_stored_span(self.folder, span) for span in row] if row else None for row in images]
            (self.folder / f"{self.name}.images.json").write_text(json.dumps(listed), encoding="utf-8")
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
        images = [table.images[int(i)] for i in picked] if table.images is not None else None
        writer.add(ids[positions], trained[positions], lengths, images=images)


def _bytes_stored(span: ImageSpan, folder: Path) -> ImageSpan:
    return replace(span, ref=stored_ref(span.ref, folder)) if isinstance(span.ref, bytes) else span


def _stored_span(folder: Path, span: ImageSpan) -> list[Any]:
    """An image as a stored table lists it: the user's file by its path and its size and time when prepared (a file
    changed since cannot be trusted to take the tokens counted for it), bytes by their file's name in `folder`."""
    if isinstance(span.ref, bytes):
        return [stored_ref(span.ref, folder), span.start, span.count]
    if _kept(span.ref):  # copied from a table of the same folder (a held-out split, a mixture's source)
        return [span.ref, span.start, span.count]
    stat = os.stat(span.ref)
    return [span.ref, span.start, span.count, stat.st_size, stat.st_mtime_ns]


def _kept(ref: Any) -> bool:
    return isinstance(ref, str) and not os.path.isabs(ref)


def _opened_span(folder: Path, ref: str, start: int, count: int, *signature: int) -> ImageSpan:
    """A listed image back as an ImageSpan; ValueError when the user's file is gone or changed since (the cache then
    prepares the data again)."""
    if not signature:  # bytes the table keeps itself, by a name relative to its folder (TokenTable.example)
        return ImageSpan(ref, start, count)
    try:
        stat = os.stat(ref)
    except OSError:
        raise ValueError(f"image {ref} is gone since the data was prepared") from None
    if [stat.st_size, stat.st_mtime_ns] != list(signature):
        raise ValueError(f"image {ref} changed since the data was prepared")
    return ImageSpan(ref, start, count)


def _trained_heads(trained: np.ndarray, starts: np.ndarray, lengths: np.ndarray, window: int) -> np.ndarray:
    """Per example, its trained tokens among the first `window` (the first token never counts: it is IGNORE)."""
    if not len(lengths):
        return np.zeros(0, dtype=np.int32)
    running = np.zeros(len(trained) + 1, dtype=np.int64)
    np.cumsum(trained, out=running[1:])
    stops = starts + np.minimum(lengths, window)
    return (running[stops] - running[starts]).astype(np.int32)
