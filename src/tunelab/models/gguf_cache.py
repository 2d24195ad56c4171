"""GGUF files are dequantized once: the plain float model, its tokenizer and its config are kept in a cache folder and
loaded from there next time (about a second instead of 15 for SmolLM2-135M, and it grows with the model; the config
alone takes transformers seconds to read from the file).

The cache key is the file's path, size and modification time, so an edited or replaced file is read afresh.
`TUNELAB_GGUF_CACHE` names another cache folder, or turns the cache off with `0`. Entries are written to a
temporary folder and renamed when complete, so a crash never leaves a half-written model to be loaded later.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("tunelab")
COMPLETE = "tunelab_cache_complete"
_DESCRIBED = {"model": "dequantized model"}  # how the log names an entry


def cache_root() -> Path | None:
    setting = os.environ.get("TUNELAB_GGUF_CACHE", "")
    if setting.lower() in ("0", "off", "false", "no"):
        return None
    if setting:
        return Path(setting).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()
    return base / "tunelab" / "gguf"


def entry(source: Any, what: str) -> Path | None:
    """Where the `what` ("model", "tokenizer" or "config") read from a GGUF source is kept (None: cache off)."""
    root = cache_root()
    if root is None or not source.gguf_file:
        return None
    path = (Path(source.path) / source.gguf_file).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return root / f"{path.stem}-{key}" / what


def cached(source: Any, what: str) -> Path | None:
    """The cached folder when it is there and complete."""
    folder = entry(source, what)
    return folder if folder is not None and (folder / COMPLETE).is_file() else None


def store(source: Any, what: str, save: Callable[[Path], None]) -> None:
    """Save `what` with `save(folder)` into the cache; a failure (full disk, read-only home) only costs speed."""
    folder = entry(source, what)
    if folder is None:
        return
    tmp = folder.with_name(f".{what}.{os.getpid()}.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save(tmp)
        (tmp / COMPLETE).write_text("complete\n", encoding="utf-8")
        if folder.exists():  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
            return
        os.replace(tmp, folder)
        log.info("GGUF: the %s is cached in %s (reused next time)", _DESCRIBED.get(what, what), folder)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("GGUF: could not cache the %s (%s); it is read from the file again next time", what, err)
