"""Reading rows from CSV, TSV, JSONL, JSON and Parquet files, a folder of split files, or a hub dataset id.

Text files are UTF-8 and may be gzip, bz2, xz or zstd-compressed (data/compression.py). Every row keeps where
it came from (file and line of the decompressed text) so that later checks can name it. Called by
`data.load_data`; knows nothing about columns or formats.
"""

from __future__ import annotations

import codecs
import csv
import functools
import io
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.data.compression import (
    DAMAGED,
    SUFFIXES,
    damaged,
    data_suffix,
    decompress,
    named_compression,
    open_decompressed,
)
from tunelab.errors import DataError

EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
DELIMITERS = {",": "comma", ";": "semicolon", "\t": "tab", "|": "'|'"}
# Files that are no text at all, by their first bytes, and what to do with them instead.
NOT_TEXT = {
    b"PK\x03\x04": "a zip archive (an Excel .xlsx workbook is one): save the sheet as CSV UTF-8, or unzip it",
    b"\xd0\xcf\x11\xe0": "an Excel .xls workbook (or another Office file): save the sheet as CSV UTF-8",
    b"PAR1": "a Parquet file: name it .parquet",
}
HINTS = {
    ".xlsx": "save the sheet as CSV UTF-8",
    ".xls": "save the sheet as CSV UTF-8",
    ".ods": "save the sheet as CSV UTF-8",
    ".txt": "a table with a header line is a .csv or .tsv; free text goes one JSON object per line, "
    '{"text": ...}, in a .jsonl',
    ".zip": "unzip it and point data_path at the file inside",
}
MAX_CSV_FIELD = 64 * 1024 * 1024  # characters in one CSV field (the csv module's own default is 128 KiB)


@dataclass
class Split:
    """The rows of one split, with the file they came from and each row's line number (when it has one)."""

    name: str
    origin: str
    rows: list[dict[str, Any]]
    lines: list[int] = field(default_factory=list)
    first_row: int = 0  # the row number of rows[0] less one, when this is a block of a larger split

    def where(self, index: int) -> str:
        """'train.jsonl line 12' / 'train.csv line 7' / 'hub dataset x, row 3': a place a user can open."""
        if self.lines:
            return f"{self.origin} line {self.lines[index]}"
        return f"{self.origin} row {self.first_row + index + 1}"

    def block(self, start: int, stop: int) -> Split:
        """Rows [start, stop) as a Split that still names each row as this one does."""
        lines = self.lines[start:stop]
        return Split(self.name, self.origin, self.rows[start:stop], lines, self.first_row + start)

    @functools.cached_property
    def columns(self) -> list[str]:
        """Every column of the rows, in the order first seen. All rows, not the first few: a column that first
        appears late (an optional `prompt` or `input`) must not be taken for absent. (A streamed JSONL file's
        format is decided from its head, the first HEAD_ROWS rows: see formats.convert_row for `input`.) Worked
        out once: the rows of a Split are not changed after it is read."""
        seen: dict[str, None] = {}
        for row in self.rows:
            if not seen.keys() >= row.keys():  # most rows have the columns already seen: a set test, no new dict
                seen.update(dict.fromkeys(row))
        return list(seen)


def read_splits(data_path: str, train_split: str, valid_split: str | None) -> dict[str, Split]:
    """Read the train (and valid) split named by the AutoTrain-style data_path / split parameters.

    data_path may be a file (the train split; valid_split may then name a second file), a folder holding
    `<split>.<ext>`, or a hub dataset id such as `tatsu-lab/alpaca`.
    """
    places = locate_splits(data_path, train_split, valid_split)
    return {name: read_location(place, name) for name, place in places.items()}


def locate_splits(data_path: str, train_split: str, valid_split: str | None) -> dict[str, Path | tuple[str, str]]:
    """Where each split is: a file, or (hub dataset id, split name); a path that is neither is a DataError."""
    path = Path(os.path.expanduser(data_path))
    places: dict[str, Path | tuple[str, str]] = {}
    if path.is_file():
        places["train"] = path
        if valid_split:
            given = Path(os.path.expanduser(valid_split))
            # `parent / name` rather than with_name(): a valid_split such as "held/out" is a path, not a bad name
            candidate = given if given.is_file() else path.parent / valid_split
            places["valid"] = _with_extension(candidate, path.parent, valid_split)
        return places
    if path.is_dir():
        places["train"] = _with_extension(path / train_split, path, train_split)
        if valid_split:
            places["valid"] = _with_extension(path / valid_split, path, valid_split)
        return places
    if _looks_like_hub_id(data_path):
        places["train"] = (data_path, train_split)
        if valid_split:
            places["valid"] = (data_path, valid_split)
        return places
    raise DataError(f"data_path {data_path!r} does not exist (expected a file, a folder or a hub dataset id)")


def read_location(place: Path | tuple[str, str], name: str) -> Split:
    return read_file(place, name) if isinstance(place, Path) else read_hub(*place)


def _with_extension(stem: Path, folder: Path, split: str) -> Path:
    """The file of a split: stem itself, or the first of stem.jsonl, stem.jsonl.gz, ..., stem.parquet there is."""
    if stem.is_file():
        return stem
    for ext in EXTENSIONS:
        for compression in ("", *SUFFIXES):
            candidate = stem.with_name(stem.name + ext + compression)
            if candidate.is_file():
                return candidate
    if stem.is_dir():
        raise DataError(
            f"{stem} is a folder, where the data file of split {split!r} is expected "
            f"(a split is one file: merge the files in it into {split}.jsonl or {split}.parquet)"
        )
    found = sorted(p.name for p in folder.iterdir() if data_suffix(p) in EXTENSIONS) if folder.is_dir() else []
    raise DataError(
        f"no file for split {split!r} in {folder} (looked for {split}{{{','.join(EXTENSIONS)}}}, "
        f"also with {'/'.join(SUFFIXES)}; found: {', '.join(found) or 'no data files'})"
    )


def _looks_like_hub_id(text: str) -> bool:
    """`owner/name`; a name ending like a data file (data/train.jsonl, a mistyped local path) is not one, so that
    it is reported as a path that does not exist rather than as a hub dataset that cannot be loaded."""
    parts = text.split("/")
    if data_suffix(Path(text)) in EXTENSIONS:
        return False
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and Path(parts[0]).suffix == ""


def read_file(path: Path, name: str) -> Split:
    """One data file -> Split; malformed content raises DataError with the file and line."""
    suffix = data_suffix(path)
    if path.is_dir() and suffix != ".parquet":  # a folder of Parquet parts is one table to pyarrow
        raise DataError(f"{path}: a folder, where a data file is expected (point at a file in it)")
    if suffix not in EXTENSIONS or (suffix == ".parquet" and named_compression(path)):
        raise DataError(_unsupported(path, suffix))
    if suffix == ".parquet":
        split = _read_parquet(path, name)
    else:
        text = _decode(decompress(_read_bytes(path), path), path)
        if suffix == ".jsonl":
            split = _read_jsonl(text, path, name)
        elif suffix == ".json":
            split = _read_json(text, path, name)
        else:
            split = _read_csv(text, path, name, "\t" if suffix == ".tsv" else ",")
    if not split.rows:
        raise DataError(f"{path}: the file has no rows")
    return split


def _unsupported(path: Path, suffix: str) -> str:
    compression = named_compression(path)
    if compression and suffix == ".parquet":
        return f"{path}: a {compression}-compressed Parquet file; Parquet compresses its own columns, decompress it"
    if compression:
        return (
            f"{path}: the name does not say what the {compression} file holds (name it like train.jsonl{path.suffix})"
        )
    hint = f"; {HINTS[suffix]}" if suffix in HINTS else ""
    return (
        f"{path}: unsupported file type {suffix or '(none)'!r} (use {', '.join(EXTENSIONS)}; text files may also be "
        f"compressed: train.jsonl.gz, {', '.join(list(SUFFIXES)[1:])}){hint}"
    )


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise unreadable(path, err) from None


def unreadable(path: Path, err: OSError) -> DataError:
    """The one line for a data file that cannot be read (also used by data/cache.py, which hashes it first)."""
    if isinstance(err, PermissionError):
        return DataError(f"{path}: cannot read the file (permission denied); make it readable for this user")
    return DataError(f"{path}: cannot read the file ({err.strerror or err})")


def _decode(raw: bytes, path: Path) -> str:
    """The text of a UTF-8 file (a BOM is dropped); anything else is a DataError naming what the file is."""
    return _utf8_text(_text_start(raw, path), path)


def _text_start(raw: bytes, path: Path) -> bytes:
    """The first bytes of a text file, its UTF-8 byte-order mark dropped; a file that is no text (a zip, a
    workbook, Parquet, UTF-16) is a DataError naming what it is."""
    for signature, what in NOT_TEXT.items():
        if raw.startswith(signature):
            raise DataError(f"{path}: not a {data_suffix(path)} file but {what}")
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # Excel's "Unicode Text", Windows PowerShell
        raise DataError(
            f"{path} line 1: not valid UTF-8 but UTF-16 (it starts with a UTF-16 byte-order mark); "
            "save the file as UTF-8 (Excel: CSV UTF-8)"
        )
    return raw[len(codecs.BOM_UTF8) :] if raw.startswith(codecs.BOM_UTF8) else raw


def _utf8_text(raw: bytes, path: Path, first_line: int = 1) -> str:
    """Bytes from line `first_line` of a file as text; not UTF-8, or NUL characters, is a DataError naming the line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = first_line + raw[: err.start].count(b"\n")
        raise DataError(
            f"{path} line {line}: not valid UTF-8 (byte {raw[err.start]:#x}); save the file as UTF-8"
        ) from None
    nul = text.find("\0")
    if nul >= 0:  # valid UTF-8, yet no text file holds NUL: UTF-16 without its byte-order mark, or binary data
        line = first_line + text.count("\n", 0, nul)
        raise DataError(
            f"{path} line {line}: holds NUL characters, so it is not UTF-8 text "
            "(UTF-16 without a byte-order mark, or a binary file); save the file as UTF-8"
        )
    return text


def _first_line(text: str) -> str:
    """The first line that is not blank, stripped."""
    match = re.match(r"\s*([^\n]*)", text)
    return match.group(1).strip() if match else ""


def _read_jsonl(text: str, path: Path, name: str) -> Split:
    first = _first_line(text)
    if first.startswith("[") or first == "{":  # a JSON document saved as .jsonl: no JSONL line is a list or a "{"
        return _read_json(text, path, name)
    return _read_lines(text, path, name)


def _read_lines(text: str, path: Path, name: str, first_line: int = 1) -> Split:
    rows, lines = [], []
    # Only "\n" ends a JSONL line: str.splitlines() also splits at U+2028, form feeds and other characters that
    # JSON writers leave unescaped inside strings, which would break good rows and shift every line number.
    for number, line in enumerate(text.split("\n"), start=first_line):
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


def _is_json_lines(text: str) -> bool:
    """Whether a .json file is JSON Lines (what `datasets`' to_json writes): a whole JSON value on its first line,
    and more after it."""
    more = re.match(r"\s*[^\n]*\n\s*\S", text)
    return bool(more) and isinstance(json_or_none(_first_line(text)), (dict, list))


def json_or_none(text: str) -> Any:
    """The JSON value of a text, or None when it is not JSON (ValueError: too many digits; RecursionError: nested
    too deeply for Python's parser)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _read_json(text: str, path: Path, name: str) -> Split:
    if _is_json_lines(text):
        return _read_lines(text, path, name)
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


def _read_csv(text: str, path: Path, name: str, default: str) -> Split:
    _refuse_json(text, path)
    # Excel writes a "sep=;" line above the header when the delimiter is not the locale's own.
    excel_sep = re.match(r"sep=([,;\t|])\r?\n", text)
    delimiter = excel_sep.group(1) if excel_sep else sniff_delimiter(text, default)
    # newline="" hands the csv module the line ends as they are (it needs them for quoted multi-line fields);
    # str.splitlines() would also split at U+2028 and form feeds inside fields.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, MAX_CSV_FIELD))  # long documents are data, not damage
    try:
        if excel_sep:
            next(reader)
        return _csv_rows(reader, path, name)
    finally:
        csv.field_size_limit(limit)


def _refuse_json(text: str, path: Path) -> None:
    """JSON under a CSV name would be read as a header of JSON fragments and end in a misleading 'column not
    found': name what the file is instead."""
    first = _first_line(text)
    value = json_or_none(first) if first.startswith(("[", "{")) else None
    if first in ("[", "{") or isinstance(value, list):
        raise DataError(f"{path}: holds JSON, not CSV (it starts with {first[0]!r}): name it .json")
    if isinstance(value, dict):
        raise DataError(f"{path}: holds JSON Lines, not CSV (its first line is a JSON object): name it .jsonl")


def sniff_delimiter(text: str, default: str = ",") -> str:
    """The delimiter of a CSV file: the one of , ; tab | that its header line holds most often outside quotes,
    the file type's own (comma, or tab for .tsv) on a tie or when there is none (a one-column file).

    Only the header is looked at: a comma file whose text is full of semicolons stays a comma file."""
    counts = dict.fromkeys(DELIMITERS, 0)
    quoted = False
    for char in text[:65536].lstrip("\r\n"):  # the header is the first line that is not blank
        if char == '"':
            quoted = not quoted  # a "" escape toggles twice, which is no change
        elif quoted:
            continue
        elif char in "\r\n":
            break
        elif char in counts:
            counts[char] += 1
    best = max(counts, key=lambda d: (counts[d], d == default))
    return best if counts[best] else default


def _csv_rows(reader: Any, path: Path, name: str) -> Split:
    try:
        header = next(reader)
        while not header:  # blank lines above the header (the csv module reads them as rows of no fields)
            header = next(reader)
    except StopIteration:
        raise DataError(f"{path}: the file is empty") from None
    except csv.Error as err:
        raise DataError(f"{path} line {reader.line_num}: malformed CSV header ({err})") from None
    if len(set(header)) != len(header):
        raise DataError(f"{path} line {reader.line_num}: duplicate column names in the header: {header}")
    rows, lines = [], []
    start = reader.line_num + 1
    delimiter = DELIMITERS.get(reader.dialect.delimiter, repr(reader.dialect.delimiter))
    try:
        for values in reader:
            if not values:
                start = reader.line_num + 1
                continue
            if len(values) != len(header):
                raise DataError(
                    f"{path} line {start}: {len(values)} fields where the header has {len(header)} "
                    f"(an unquoted {delimiter} or quote?)"
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
    """A split of a hub dataset through `datasets` (needs network access or a local cache). AutoTrain's
    `config:split` (train_split "all:test") names the dataset's configuration, its subset, before the split."""
    import datasets

    from tunelab.hub import hub_reachable

    if not hub_reachable():
        raise DataError(
            f"cannot load hub dataset {dataset_id!r}: the Hugging Face hub is out of reach from this machine "
            "(point data_path at a local file or folder)"
        )
    try:
        subset, part = hub_subset(split)
        ds = datasets.load_dataset(dataset_id, name=subset, split=part)
    except Exception as err:  # offline, unknown id, missing split, gated repo...
        raise DataError(
            f"cannot load hub dataset {dataset_id!r} split {split!r}: {_first_message_line(err)} "
            "(no network? point data_path at a local file or folder)"
        ) from None
    return Split(split, f"hub dataset {dataset_id} ({split})", ds.to_list())


def hub_subset(split: str) -> tuple[str | None, str]:
    """AutoTrain's `subset:split` ("all:test") as (subset, split); (None, split) for a plain split, `datasets`'
    slices included ("train[:100]", "all:test[:10%]": a colon inside brackets is the slice's)."""
    named = re.fullmatch(r"([^\[\]:]+):(.+)", split)
    return (named[1].strip(), named[2].strip()) if named else (None, split)


def _first_message_line(err: Exception) -> str:
    """The first line of an error's message (at most 200 characters), or its type when the message is empty."""
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else type(err).__name__


# ------------------------------------------------------------------------------------------- reading in blocks

BLOCK_BYTES = 1 << 20  # a JSON Lines file is read and handed to the workers this much at a time
# Rows that show images take milliseconds each (every image decoded, its tokens found): handed out in smaller blocks,
# so that the workers share a small file too.
IMAGE_BLOCK_BYTES, IMAGE_BLOCK_ROWS = 64 << 10, 200
HEAD_ROWS = 1000  # the rows the row format is decided from (as Split.columns looks at)


@dataclass
class SplitStream:
    """One split read a block at a time: `head` (its first rows, to decide the row format from) and `blocks()`.

    JSON Lines files (plain or compressed) are streamed: a block is (first line number, bytes), parsed by
    `block_rows` where the work is done, so memory holds a few blocks whatever the file's size. Every other
    source (CSV, JSON, Parquet, a hub dataset) is read whole and handed out in slices of rows."""

    name: str
    origin: str
    head: Split
    _blocks: Any  # iterator of blocks, the head's among them

    def blocks(self) -> Any:
        return self._blocks


def stream_split(
    place: Path | tuple[str, str], name: str, rows_per_block: int = 2000, block_bytes: int = BLOCK_BYTES
) -> SplitStream:
    """The split at `place` (from locate_splits) as a SplitStream; the first problems of the file (not text, not
    UTF-8, not JSON) surface here, the others as the blocks are parsed."""
    if isinstance(place, Path) and data_suffix(place) == ".jsonl" and not place.is_dir():
        stream = _jsonl_stream(place, name, block_bytes)
        if stream is not None:
            return stream
    whole = read_location(place, name)
    blocks = (whole.block(i, i + rows_per_block) for i in range(0, len(whole.rows), rows_per_block))
    return SplitStream(name, whole.origin, whole.block(0, HEAD_ROWS), blocks)


def block_rows(block: Any, origin: str, name: str) -> Split:
    """The rows of one block of a SplitStream (a worker's first step)."""
    if isinstance(block, Split):
        return block
    first_line, raw = block
    path = Path(origin)
    text = _utf8_text(raw, path, first_line)
    return _read_lines(text, path, name, first_line)


def _jsonl_stream(path: Path, name: str, block_bytes: int = BLOCK_BYTES) -> SplitStream | None:
    """A JSON Lines file as a SplitStream; None when it is a JSON document under a .jsonl name (read whole)."""
    blocks = _line_blocks(path, block_bytes)
    prefetched = []
    head_rows: list[dict] = []
    head_lines: list[int] = []
    for block in blocks:
        if not prefetched:
            first = _first_line(block[1][:65536].decode("utf-8", errors="replace"))
            if first.startswith("[") or first == "{":
                return None
        prefetched.append(block)
        split = block_rows(block, str(path), name)
        head_rows += split.rows
        head_lines += split.lines
        if len(head_rows) >= HEAD_ROWS:
            break
    if not head_rows:
        raise DataError(f"{path}: the file has no rows")
    head = Split(name, str(path), head_rows[:HEAD_ROWS], head_lines[:HEAD_ROWS])
    return SplitStream(name, str(path), head, itertools.chain(prefetched, blocks))


def _line_blocks(path: Path, block_bytes: int = BLOCK_BYTES) -> Any:
    """(first line number, bytes ending at a line end) blocks of a file, decompressed; the file's first bytes are
    checked as `_text_start` checks a whole file's."""
    try:
        stream, kind = open_decompressed(path)
    except OSError as err:
        raise unreadable(path, err) from None
    with stream:
        line, carry, first = 1, [], True  # carry: the chunks since the last line end (a line longer than a block)
        while True:
            try:
                chunk = stream.read(block_bytes)
            except DAMAGED as err:
                raise damaged(path, kind, err) from None
            if first:
                chunk = _text_start(chunk, path)
                first = False
            if not chunk:
                break
            cut = chunk.rfind(b"\n") + 1  # looked for in the new chunk alone: a long line costs no more
            if not cut:
                carry.append(chunk)
                continue
            block = b"".join([*carry, chunk[:cut]])
            carry = [chunk[cut:]] if cut < len(chunk) else []
            yield line, block
            line += block.count(b"\n")
        if carry:
            yield line, b"".join(carry)
