"""valid_size: a validation split held out of the train split, for data that comes as one file.

The examples are drawn after every row has been read, checked and tokenized, so a bad row is named by its file and
line on whichever side it lands, and from the run's seed alone, so every process of a distributed run, a resumed
run and the prepared-data cache (whose key holds valid_size and seed) see the same split. A mixture is split after
its sources are drawn. The rest of the train split keeps its order (the trainer shuffles it).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from tunelab.data.store import TableWriter, TokenTable, copy_examples
from tunelab.errors import DataError

log = logging.getLogger("tunelab")


def held_out_count(valid_size: float, examples: int, origin: str) -> int:
    """How many of `examples` train examples valid_size holds out: a share (rounded, at least one) or a count.
    At least one example must be left to train on."""
    count = max(1, round(valid_size * examples)) if valid_size < 1 else int(valid_size)
    if count >= examples:
        raise DataError(
            f"{origin}: valid_size={valid_size:g} holds out {count} of its {examples} examples, leaving none to train "
            "on: lower valid_size, or give a validation split of its own (valid_split)"
        )
    return count


def split_indices(examples: int, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(the indices kept for training, the `count` held out), each in their original order."""
    held = np.zeros(examples, dtype=bool)
    held[np.random.default_rng(seed).permutation(examples)[:count]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def stratified_indices(labels: list[str], count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """split_indices for a classifier's examples: each label held out in proportion to its share of the split, the
    examples left over by rounding down going first to labels that would have none (so that each is measured where
    it can be), then to the largest remainders; every label keeps at least one example to train on."""
    names, label_ids, sizes = np.unique(np.asarray(labels, dtype=object), return_inverse=True, return_counts=True)
    share = sizes * count / len(labels)
    taken = np.floor(share).astype(np.int64)
    taken[np.lexsort((taken - share, taken > 0))[: count - int(taken.sum())]] += 1
    taken = np.minimum(taken, sizes - 1)
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), dtype=bool)
    for label in range(len(names)):
        members = np.flatnonzero(label_ids == label)
        held[rng.permutation(members)[: taken[label]]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def described(count: int, examples: int, origin: str, valid_size: float, seed: int) -> str:
    """The held-out split's origin, as the log, the dry run and tunelab_run.json show it."""
    return f"{count} of the {examples} examples of {origin}, held out by valid_size={valid_size:g} and seed {seed}"


def hold_out(data: Any, valid_size: float, seed: int) -> Any:
    """`data` (EncodedData, PreferenceData, KTO or prompt data: anything with `train`, `valid` and `origins`) with
    its validation split drawn from its train split. A token table stored in files is rewritten beside them as two
    tables, and its own files removed."""
    train, origin = data.train, data.origins["train"]
    count = held_out_count(valid_size, len(train), origin)
    kept, held = split_indices(len(train), count, seed)
    if isinstance(train, TokenTable):
        new_train, new_valid = _split_table(train, kept, held)
    else:
        new_train, new_valid = [train[i] for i in kept], [train[i] for i in held]
    origins = {**data.origins, "valid": described(count, len(train), origin, valid_size, seed)}
    log.info("valid_size=%g: %d of the %d train examples held out for validation", valid_size, count, len(train))
    return dataclasses.replace(data, train=new_train, valid=new_valid, origins=origins)


def _split_table(table: TokenTable, kept: np.ndarray, held: np.ndarray) -> tuple[TokenTable, TokenTable]:
    tables = []
    for name, indices in (("held-train", kept), ("held-valid", held)):
        writer = TableWriter(table.folder, table.window, name)
        copy_examples(table, indices, writer)
        tables.append(writer.finish())
    if table.folder is not None and table.name is not None:  # the whole split, now copied into the two
        for path in table.folder.glob(f"{table.name}.*"):
            path.unlink()
    return tables[0], tables[1]
