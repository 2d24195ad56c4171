"""`streaming: true`: train without preparing everything first; each block of rows is prepared as training reads it.

A split is read a block at a time (data/sources.SplitStream: 1 MiB of a JSON Lines file, or 2,000 rows of any
other source), and each block goes through the same steps as prepared data: rows checked, formatted with the
template, tokenized, cut into the method's rows (cut to block_size; `sft` drops examples with nothing to learn and,
with packing, packs within the block; `default` joins the block's texts and cuts them into blocks, so the tail of
every block is left out). The rows come out in file order, the same on every pass, which is what a resumed run
needs to skip the batches it has already trained on. Bad rows are named as their block is read: bad_rows=error
stops the run there, skip leaves them out with a warning.

What streaming gives up: no shuffling and no length-grouped batches (rows are trained in file order), no count
of the examples before training (so `max_steps` is required), and the dry run's figures come from the first
block only. Only the methods that train on examples (`default`, `sft`) stream. A vision-language model's rows that
show images stream too (sft), in smaller blocks (their images are opened and written in as each block is read).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunelab.data.formats import raise_bad_rows
from tunelab.data.pipeline import Formatter, encode_block
from tunelab.data.sources import SplitStream, stream_split
from tunelab.data.store import TableWriter, TokenTable

log = logging.getLogger("tunelab")


class StreamedRows(torch.utils.data.IterableDataset):
    """The training rows of one split, prepared a block at a time as they are read."""

    def __init__(
        self,
        place: Path | tuple[str, str],
        name: str,
        formatter: Formatter,
        params: Any,
        build: Any,
        blocks: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        self.place, self.name, self.formatter, self.params, self.build = place, name, formatter, params, build
        self.blocks = blocks  # (rows, bytes) a block holds, when not stream_split's defaults (rows with images)

    def __iter__(self) -> Any:
        stream = stream_split(self.place, self.name, *self.blocks)
        for block in stream.blocks():
            table = block_table(block, stream.origin, self.name, self.formatter, self.params)
            rows, _ = self.build(table, self.params)
            for index in range(len(rows)):
                yield rows[index]

    def lengths(self) -> np.ndarray:
        """The longest a row can be (what the memory estimate needs): the rows are not known before training."""
        return np.array([self.params.block_size])


def block_table(block: Any, origin: str, name: str, formatter: Formatter, params: Any) -> TokenTable:
    """One block of a split prepared into a token table in memory; its bad rows settled as bad_rows says."""
    done = encode_block(block, origin, name, formatter)
    if done.bad:
        if params.bad_rows != "skip":
            hint = "fix them, or set bad_rows: skip (--bad-rows skip) to leave them out"
            raise_bad_rows(done.problems, f"{origin} (streamed, the block from {done.split.where(0)})", hint, done.bad)
        log.warning("%s: skipped %d bad row(s) (bad_rows=skip): %s", origin, done.bad, "; ".join(done.problems))
    writer = TableWriter(None, params.block_size)
    writer.add(*done.arrays, images=done.images)
    return writer.finish()


def first_block(stream: SplitStream, formatter: Formatter, params: Any) -> TokenTable:
    """The first block of a split, prepared: what the dry run shows of a streamed run, and the checks of its start."""
    block = next(iter(stream.blocks()))
    return block_table(block, stream.origin, stream.name, formatter, params)
