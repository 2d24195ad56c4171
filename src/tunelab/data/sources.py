"""Reading rows from CSV, JSONL, JSON and Parquet files, a folder of split files, or a hub dataset id.

Every row keeps where it came from (file and line) so that later checks can name it. Called by
`data.load_data`; knows nothing about columns or formats.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.errors import DataError

EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
MAX_CSV_FIELD = 64 * 1024 * 1024  # characters in one CSV field (the csv module's own default is 128 KiB)


@dataclass
class Split:
    """The rows of one split, with the file they came from and each row's line number (when it has one)."""

    name: str
    origin: str
    rows: list[dict[str, Any]]
    lines: list[int] = field(default_factory=list)

    def where(self, index: int) -> str:
        """'train.jsonl line 12' / 'train.csv line 7' / 'hub dataset x, row 3': a place a user can open."""
        if self.lines:
            return f"{self.origin} line {self.lines[index]}"
        return f"{self.origin} row {index + 1}"

    @property
    def columns(self) -> list[str]:
        seen: dict[str, None] = {}
        for row in self.rows[:1000]:
            seen.update(dict.fromkeys(row))
        return list(seen)


def read_splits(data_path: str, train_split: str, valid_split: str | None) -> dict[str, Split]:
    """Read the train (and valid) split named by the AutoTrain-style data_path / split parameters.

    data_path may be a file (the train split; valid_split may then name a second file), a folder holding
    `<split>.<ext>`, or a hub dataset id such as `tatsu-lab/alpaca`.
    """
    path = Path(os.path.expanduser(data_path))
    splits: dict[str, Split] = {}
    if path.is_file():
        splits["train"] = read_file(path, "train")
        if valid_split:
            candidate = Path(valid_split) if Path(valid_split).is_file() else path.with_name(valid_split)
            splits["valid"] = read_file(_with_extension(candidate, path.parent, valid_split), "valid")
        return splits
    if path.is_dir():
        splits["train"] = read_file(_with_extension(path / train_split, path, train_split), "train")
        if valid_split:
            splits["valid"] = read_file(_with_extension(path / valid_split, path, valid_split), "valid")
        return splits
    if _looks_like_hub_id(data_path):
        splits["train"] = read_hub(data_path, train_split)
        if valid_split:
            splits["valid"] = read_hub(data_path, valid_split)
        return splits
    raise DataError(f"data_path {data_path!r} does not exist (expected a file, a folder or a hub dataset id)")


def _with_extension(stem: Path, folder: Path, split: str) -> Path:
    if stem.is_file():
        return stem
    for ext in EXTENSIONS:
        candidate = stem.with_name(stem.name + ext)
        if candidate.is_file():
            return candidate
    found = sorted(p.name for p in folder.iterdir() if p.suffix in EXTENSIONS) if folder.is_dir() else []
    raise DataError(
        f"no file for split {split!r} in {folder} (looked for {split}{{{','.join(EXTENSIONS)}}}; "
        f"found: {', '.join(found) or 'no data files'})"
    )


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and Path(parts[0]).suffix == ""


def read_file(path: Path, name: str) -> Split:
    """One data file -> Split; malformed content raises DataError with the file and line."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        split = _read_parquet(path, name)
    else:
        text = _decode(path)
        if suffix == ".jsonl":
            split = _read_jsonl(text, path, name)
        elif suffix == ".json":
            split = _read_json(text, path, name)
        elif suffix in (".csv", ".tsv"):
            split = _read_csv(text, path, name, "\t" if suffix == ".tsv" else ",")
        else:
            raise DataError(f"{path}: unsupported file type {suffix!r} (use {', '.join(EXTENSIONS)})")
    if not split.rows:
        raise DataError(f"{path}: the file has no rows")
    return split


def read_texts(path: Path, column: str, name: str) -> list[str]:
    """The values of one column of a data file, as text (for scoring or labelling a file)."""
    split = read_file(path, name)
    if column not in split.columns:
        raise DataError(f"{path}: column {column!r} not found (columns: {', '.join(split.columns[:20])})")
    return [str(row.get(column) or "") for row in split.rows]


def _decode(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read the file ({err.strerror or err})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path} line {line}: not valid UTF-8 (byte {raw[err.start]:#x}); save the file as UTF-8"
        ) from None


def _read_jsonl(text: str, path: Path, name: str) -> Split:
    rows, lines = [], []
    # Only "\n" ends a JSONL line: str.splitlines() also splits at U+2028, form feeds and other characters that
    # JSON writers leave unescaped inside strings, which would break good rows and shift every line number.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        row = _parse_json(line, path, number)
        if not isinstance(row, dict):
            raise DataError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
        lines.append(number)
    return Split(name, str(path), rows, lines)


def _parse_json(text: str, path: Path, first_line: int = 1) -> Any:
    """json.loads with every failure as a DataError naming the line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        line = first_line + err.lineno - 1
        raise DataError(f"{path} line {line}: not valid JSON ({err.msg} at column {err.colno})") from None
    except ValueError as err:  # a number of more than 4300 digits (Python's int limit)
        raise DataError(f"{path} line {first_line}: not usable JSON ({err})") from None
    except RecursionError:
        raise DataError(f"{path} line {first_line}: not usable JSON (nested too deeply)") from None


def _read_json(text: str, path: Path, name: str) -> Split:
    data = _parse_json(text, path)
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]} as some exports write
        lists = [value for value in data.values() if isinstance(value, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON list of objects (or an object holding one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects")
    for index, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path} item {index + 1}: expected a JSON object, got {type(row).__name__}")
    return Split(name, str(path), data)


def _read_csv(text: str, path: Path, name: str, delimiter: str) -> Split:
    # newline="" hands the csv module the line ends as they are (it needs them for quoted multi-line fields);
    # str.splitlines() would also split at U+2028 and form feeds inside fields.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, MAX_CSV_FIELD))  # long documents are data, not damage
    try:
        return _csv_rows(reader, path, name)
    finally:
        csv.field_size_limit(limit)


def _csv_rows(reader: Any, path: Path, name: str) -> Split:
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{path}: the file is empty") from None
    except csv.Error as err:
        raise DataError(f"{path} line 1: malformed CSV header ({err})") from None
    if len(set(header)) != len(header):
        raise DataError(f"{path} line 1: duplicate column names in the header: {header}")
    rows, lines = [], []
    start = reader.line_num + 1
    try:
        for values in reader:
            if not values:
                start = reader.line_num + 1
                continue
            if len(values) != len(header):
                raise DataError(
                    f"{path} line {start}: {len(values)} fields where the header has {len(header)} "
                    "(an unquoted comma or quote?)"
                )
            rows.append(dict(zip(header, values, strict=True)))
            lines.append(start)
            start = reader.line_num + 1
    except csv.Error as err:
        raise DataError(f"{path} line {reader.line_num}: malformed CSV ({err})") from None
    return Split(name, str(path), rows, lines)


def _read_parquet(path: Path, name: str) -> Split:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for damaged files and unconvertible columns
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    return Split(name, str(path), rows)


def read_hub(dataset_id: str, split: str) -> Split:
    """A split of a hub dataset through `datasets` (needs network access or a local cache)."""
    import datasets

    from tunelab.hub import hub_reachable

    if not hub_reachable():
        raise DataError(
            f"cannot load hub dataset {dataset_id!r}: the Hugging Face hub is out of reach from this machine "
            "(point data_path at a local file or folder)"
        )
    try:
        ds = datasets.load_dataset(dataset_id, split=split)
    except Exception as err:  # offline, unknown id, missing split, gated repo...
        raise DataError(
            f"cannot load hub dataset {dataset_id!r} split {split!r}: {str(err).splitlines()[0][:200]} "
            "(no network? point data_path at a local file or folder)"
        ) from None
    return Split(split, f"hub dataset {dataset_id} ({split})", ds.to_list())
