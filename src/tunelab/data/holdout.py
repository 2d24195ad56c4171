"""valid_size: a validation split held out of the train split, for data that comes as one file.

The examples are drawn after every row has been read, checked and tokenized, so a bad row is named by its file and
line on whichever side it lands, and from the run's seed alone, so every process of a distributed run, a resumed
run and the prepared-data cache (whose key holds valid_size and seed) see the same split. Each source of a mixture
is split before it is drawn from (a weight repeats examples: a held-out one must never be trained on). Examples that
share a prompt (preference pairs, kto's answers) are held out together. The rest of the train split keeps its order
(the trainer shuffles it).

`saved_hold_out` finds a finished run's hold-out again for `tunelab evaluate` (inference/evaluate.py): given the
run's own data and `--split valid`, the evaluators measure exactly the examples it held out (`--split train`: those
it trained on), drawn by the same calls with the same seed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.data.sources import locate_splits
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


def split_indices(
    examples: int, count: int, seed: int, groups: list[Any] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(the indices kept for training, the `count` held out), each in their original order. With `groups` (one
    key per example: prompt_groups), whole groups are held out: taken in a random order where they still fit in
    `count`, so that a big group does not make the split far larger than asked (when none fits, the smallest
    one); one group at least is left to train on."""
    held = np.zeros(examples, dtype=bool)
    rng = np.random.default_rng(seed)
    if groups is None:
        held[rng.permutation(examples)[:count]] = True
        return np.flatnonzero(~held), np.flatnonzero(held)
    keys = {key: number for number, key in enumerate(dict.fromkeys(groups))}  # in order of first appearance
    group_of = np.array([keys[key] for key in groups], dtype=np.int64)
    sizes = np.bincount(group_of, minlength=len(keys))
    taken, total = [], 0
    for group in rng.permutation(len(keys)):
        if total + sizes[group] <= count and len(taken) < len(keys) - 1:
            taken.append(group)
            total += sizes[group]
    if not taken and len(keys) > 1:
        taken = [int(np.argmin(sizes))]
    held[np.isin(group_of, taken)] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def prompt_groups(items: Any) -> list[Any] | None:
    """Each example's prompt, where examples can share one (preference pairs, kto's answers, grpo's prompts): the
    examples of a prompt are held out together, so that no prompt is both trained on and measured. A prompt that shows
    images is told apart by them too (one question asked of many images is many prompts). None for examples without a
    prompt apart (token tables)."""
    if isinstance(items, TokenTable) or not len(items) or not hasattr(items[0], "prompt_ids"):
        return None
    return [
        (tuple(item.prompt_ids), tuple(getattr(shown, "ref", shown) for shown in getattr(item, "images", None) or ()))
        for item in items
    ]


def apportion(sizes: Any, count: int, favour_none: bool = False) -> np.ndarray:
    """`count` shared out over groups of `sizes` in proportion to them: rounded down, then the rest one at a time by
    largest remainder (with `favour_none`, first to groups given none yet), where a group has room; every group
    keeps at least one of its own, so the shares may fall short of `count`."""
    sizes = np.asarray(sizes, dtype=np.int64)
    share = sizes * count / max(int(sizes.sum()), 1)
    room = np.maximum(sizes - 1, 0)
    counts = np.minimum(np.floor(share).astype(np.int64), room)
    order = np.lexsort((counts - share, counts > 0)) if favour_none else np.argsort(counts - share, kind="stable")
    for group in order:
        if counts.sum() >= count:
            break
        counts[group] += counts[group] < room[group]
    return counts


def stratified_indices(labels: list[str], count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """split_indices for a classifier's examples: each label held out in proportion to its share of the split
    (apportion), the examples left over by rounding down going first to labels that would have none (so that each
    is measured where it can be); every label keeps at least one example to train on, so fewer than `count` may be
    held out (none: the caller's DataError)."""
    names, label_ids, sizes = np.unique(np.asarray(labels, dtype=object), return_inverse=True, return_counts=True)
    taken = apportion(sizes, count, favour_none=True)
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
    kept, held = split_indices(len(train), count, seed, prompt_groups(train))
    if not len(kept):
        raise DataError(
            f"{origin}: valid_size={valid_size:g} holds out every prompt's examples, leaving none to train on: "
            "lower valid_size"
        )
    if isinstance(train, TokenTable):
        new_train, new_valid = _split_table(train, kept, held)
    else:
        new_train, new_valid = [train[i] for i in kept], [train[i] for i in held]
    origins = {**data.origins, "valid": described(len(held), len(train), origin, valid_size, seed)}
    log.info("valid_size=%g: %d of the %d train examples held out for validation", valid_size, len(held), len(train))
    return dataclasses.replace(data, train=new_train, valid=new_valid, origins=origins)


def _split_table(table: TokenTable, kept: np.ndarray, held: np.ndarray) -> tuple[TokenTable, TokenTable]:
    tables = []
    for side, indices in (("kept", kept), ("held", held)):  # a mixture's sources each have their own
        writer = TableWriter(table.folder, table.window, f"{table.name or 'train'}-{side}")
        copy_examples(table, indices, writer)
        tables.append(writer.finish())
    if table.folder is not None and table.name is not None:  # the whole split, now copied into the two
        for path in table.folder.glob(f"{table.name}.*"):
            path.unlink()
    return tables[0], tables[1]


# ---- a finished run's hold-out, found again (tunelab evaluate: inference/evaluate.py and the evaluators it calls)

VALID_NAMES = ("valid", "validation")  # the split names that ask evaluate for a run's held-out examples
_DESCRIBED = re.compile(r"(\d+) of the (\d+) examples of ")


@dataclasses.dataclass(frozen=True)
class SavedHoldOut:
    """Which examples of a valid_size run's own data an evaluation asked for: `side` "valid" (those held out) or
    "train" (those trained on), read from the run's train split (`split`) and drawn again with its valid_size and
    seed. `saved` is the run's own description of its held-out split (tunelab_run.json), `labels` a classifier's
    label counts per split, both checked against what is drawn now."""

    side: str
    split: str
    valid_size: float
    seed: int
    saved: str | None = None
    labels: dict[str, dict[str, int]] | None = None

    def pick(
        self, examples: int, origin: str, labels: list[str] | None = None, groups: list[Any] | None = None
    ) -> tuple[np.ndarray, str]:
        """(the indices of this side's examples among the `examples` read from `origin`, in file order; what they
        are, as results and reports say it). `labels`: a classifier's, drawn per label as training drew them;
        `groups`: the examples' prompts (prompt_groups), held out together as training held them. A DataError when
        the data no longer holds what the run held its examples out of."""
        found = _DESCRIBED.match(self.saved or "")
        if found and int(found.group(2)) != examples:
            what = f"holds {examples} examples now, where the run held {found.group(1)} of its {found.group(2)} out"
            raise self._changed(origin, what)
        count = held_out_count(self.valid_size, examples, origin)
        if labels is None:
            kept, held = split_indices(examples, count, self.seed, groups)
        else:
            kept, held = stratified_indices(labels, count, self.seed)
            for side, indices in (("train", kept), ("valid", held)):
                drawn, counted = dict(Counter(labels[i] for i in indices)), (self.labels or {}).get(side)
                if counted is not None and drawn != counted:
                    what = f"gives its {side} examples the labels {drawn}, where the run counted {counted}"
                    raise self._changed(origin, what)
        if self.side == "valid":
            return held, described(len(held), examples, origin, self.valid_size, self.seed)
        how = f"valid_size={self.valid_size:g} and seed {self.seed}"
        return kept, f"the {len(kept)} of the {examples} examples of {origin} trained on (the rest held out by {how})"

    @staticmethod
    def _changed(origin: str, what: str) -> DataError:
        return DataError(
            f"{origin} {what}: the data changed since training, so the examples valid_size held out cannot be found "
            "again; evaluate on data of its own (a file the run never saw)"
        )


def saved_hold_out(
    saved: dict[str, Any], run: dict[str, Any], folder: Path, data_path: str, split: str
) -> SavedHoldOut | None:
    """The hold-out a finished run's evaluation on `data_path`'s `split` asks for, or None when it asks for none:
    the run had no valid_size, `data_path` is not the data it trained on (the same file or folder, by resolved
    path; a hub dataset by its id), or `split` is neither a validation name (VALID_NAMES) nor its train split (that
    one is logged: it reads every example, the trained ones too). `saved` is the run's training_params.json, `run`
    its tunelab_run.json, `folder` the run folder (a relative data_path is found from where the run was started)."""
    if saved.get("valid_size") is None or not isinstance(saved.get("data_path"), str):
        return None
    train_split = saved.get("train_split") or "train"
    if not _same_data(saved["data_path"], saved.get("project_name"), folder, data_path, train_split):
        return None
    side = "valid" if split in VALID_NAMES else "train" if split in ("train", train_split) else None
    if side is None:
        log.info(
            "evaluate: %s is the data %s trained on, with valid_size=%g: split %r reads all of it, the examples "
            "trained on included; --split valid measures the held-out ones (--split train those trained on)",
            data_path, folder, saved["valid_size"], split,
        )  # fmt: skip
        return None
    data = run.get("data") if isinstance(run.get("data"), dict) else {}
    labels = run.get("label_counts") if isinstance(run.get("label_counts"), dict) else None
    return SavedHoldOut(side, train_split, saved["valid_size"], saved.get("seed", 42), data.get("valid"), labels)


def _same_data(trained: str, project_name: Any, folder: Path, given: str, train_split: str) -> bool:
    """Whether `given` is the data a run named `trained` (as it was given, perhaps relative to where the run was
    started: found from the run folder and its relative project_name, else the current folder): a file or folder
    whose train split is the same file as the run's; a hub dataset by the same id."""
    target = Path(os.path.expanduser(given))
    if not target.exists():
        return given == trained  # a hub dataset (a missing path is an error when it is read)
    places = [Path(os.path.expanduser(trained))]
    if not places[0].is_absolute():
        started = _started_in(folder, project_name)
        places = ([started / places[0]] if started is not None else []) + [Path.cwd() / places[0]]
    wanted = _train_file(target, train_split)
    return wanted is not None and any(_train_file(place, train_split) == wanted for place in places)


def _train_file(path: Path, train_split: str) -> Path | None:
    """The file a run's train split is read from at `path` (the file itself, or the split's file in a folder)."""
    if not path.exists():
        return None
    try:
        return Path(locate_splits(str(path), train_split, None)["train"]).resolve()
    except DataError:
        return None


def _started_in(folder: Path, project_name: Any) -> Path | None:
    """The folder a run was started from: its run folder without its relative project_name's parts."""
    if not isinstance(project_name, str) or Path(os.path.expanduser(project_name)).is_absolute():
        return None
    parts = Path(project_name).parts
    whole = Path(folder).absolute().parts
    return Path(*whole[: -len(parts)]) if parts and whole[-len(parts) :] == parts else None
