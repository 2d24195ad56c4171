"""Compressed data files (`train.jsonl.gz`, `train.csv.zst`, ...): which compression a file uses, and its bytes.

A file's first bytes decide, since every one of these formats starts with a fixed signature: a gzip file saved as
`train.jsonl` is still read, and a `.gz` name on a file that is not gzip data is an error rather than a guess.
gzip, bz2 and xz come with Python; zstd goes through pyarrow (a dependency already), as Python has no zstd module
before 3.14.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import zlib
from pathlib import Path
from typing import BinaryIO

from tunelab.errors import DataError

SUFFIXES = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}
SIGNATURES = {b"\x1f\x8b": "gzip", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
# What the decompressors raise for damaged or cut-short data (pyarrow's errors are OSError / ValueError too).
DAMAGED = (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError)


def named_compression(path: Path) -> str | None:
    """The compression a file's name says: 'gzip' for train.jsonl.gz, None for train.jsonl."""
    return SUFFIXES.get(path.suffix.lower())


def data_suffix(path: Path) -> str:
    """The suffix that says what a file holds, behind any compression suffix: '.jsonl' for train.jsonl.gz."""
    if named_compression(path):
        return Path(path.stem).suffix.lower()
    return path.suffix.lower()


def decompress(raw: bytes, path: Path) -> bytes:
    """raw unpacked when it is compressed (by its signature), else as it is; damage is one DataError."""
    found = _compression_of(raw, path)
    if found is None:
        return raw
    try:
        return _unpack(raw, found)
    except DAMAGED as err:
        raise damaged(path, found, err) from None


def _compression_of(start: bytes, path: Path) -> str | None:
    """The compression a file's first bytes show (None: plain); a compression suffix on plain data is an error."""
    found = next((kind for signature, kind in SIGNATURES.items() if start.startswith(signature)), None)
    named = named_compression(path)
    if found is None and named and start:
        raise DataError(
            f"{path}: not a readable {named} file (it does not start like one); "
            f"if it is not compressed, drop {path.suffix} from its name"
        )
    return found


def _unpack(raw: bytes, kind: str) -> bytes:
    if kind == "gzip":
        return gzip.decompress(raw)
    if kind == "bz2":
        return bz2.decompress(raw)
    if kind == "xz":
        return lzma.decompress(raw)
    import pyarrow as pa

    return pa.input_stream(pa.py_buffer(raw), compression="zstd").read()


def open_decompressed(path: Path) -> tuple[BinaryIO, str | None]:
    """A binary stream of the file's content, decompressed as it is read when its signature says it is compressed
    (what `decompress` does for a whole file, a block at a time), and the compression found (None: plain). Errors
    the stream raises part way (`DAMAGED`) go through `damaged`."""
    with open(path, "rb") as probe:
        found = _compression_of(probe.read(8), path)
    if found is None:
        return open(path, "rb"), None  # noqa: SIM115 - the caller closes it
    openers = {"gzip": gzip.open, "bz2": bz2.open, "xz": lzma.open}
    if found in openers:
        return openers[found](path, "rb"), found
    import pyarrow as pa

    return pa.input_stream(str(path), compression="zstd"), found


def damaged(path: Path, kind: str | None, err: Exception) -> DataError:
    """The one-line error for a compressed file that stops decompressing part way."""
    return DataError(
        f"{path}: not a readable {kind} file ({err}); it is damaged or cut short, compress or download it again"
    )
