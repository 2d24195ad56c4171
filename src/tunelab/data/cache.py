"""Prepared data as a cache: read, checked, tokenized and cut into rows once, reused by every run that needs the same.

The key is a hash of everything that shapes the prepared data (`key_inputs` lists it, `docs/data.md` too):
tunelab's prepared-data format version, the method, the data files (resolved path, size and a SHA-256 of the
content), the tokenizer (a hash of its full serialized state: vocabulary, merges, normalizer, special tokens,
its own chat template), the text of tunelab's built-in chat templates, and every parameter the data step and the
method's rows read (columns, chat_template, block_size, masking, packing, lengths, bad_rows, splits). Change any of
them and the key changes; nothing else can make a stale entry match.

An entry is a folder `<cache>/<key>/`: the token tables (data/store.py), `prepared.pkl` (the data object, the rows
and their statistics, the warnings the preparation logged) and `inputs.json` (the key's inputs, for a curious
user). It is built in a temporary folder beside it and renamed into place, so an entry is whole or absent; a lock
file makes the processes of a launch wait for the one that prepares, then reuse its entry. Deleting the cache
folder, or any entry, at any time is safe: a run that has its tables open keeps reading them, the next one
prepares again.

The cache is `cache_dir` (default `$TUNELAB_DATA_CACHE`, else `$XDG_CACHE_HOME/tunelab/data`, else
`~/.cache/tunelab/data`); `no_cache` prepares into a temporary folder removed when the process exits. Hub
datasets are prepared every time (their content is only known once downloaded).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunelab.config.llm import custom_chat_template
from tunelab.data.images import StoredImage
from tunelab.data.mixture import is_mixture, parse_sources
from tunelab.data.sources import locate_splits, unreadable
from tunelab.data.store import TokenTable
from tunelab.data.templates import BUILTIN, builtin_template
from tunelab.errors import TunelabError
from tunelab.methods import REGISTRY

log = logging.getLogger("tunelab")

FORMAT_VERSION = 11  # raise whenever what is stored, or how it is computed, changes (11: LLaMA-Factory history)
# Every parameter the data step (data/*.py) or a method's build_rows reads: these, shared by the methods, and each
# method's own (its registry line's data_params, methods/__init__.py), for every run alike.
DATA_FIELDS = (
    "data_path",
    "train_split",
    "valid_split",
    "valid_size",
    "text_column",
    "prompt_text_column",
    "image_column",
    "chat_template",
    "chat_template_kwargs",
    "add_eos_token",
    "completion_only_loss",
    "mask_history",
    "bad_rows",
    "packing",
    "block_size",
    "model_max_length",
    *dict.fromkeys(name for entry in REGISTRY.values() for name in entry.data_params),
)


def cache_root(params: Any) -> Path | None:
    """The cache folder of these parameters (None: no_cache)."""
    if params.no_cache:
        return None
    if params.cache_dir:
        return Path(params.cache_dir).expanduser()
    if os.environ.get("TUNELAB_DATA_CACHE"):
        return Path(os.environ["TUNELAB_DATA_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "tunelab" / "data"


def key_inputs(params: Any, tokenizer: Any, processor: Any = None) -> dict[str, Any] | None:
    """Everything the prepared data depends on, as JSON-able values (None: not cacheable, a hub dataset);
    `processor`: a vision-language model's, whose image processor decides the tokens an image takes."""
    files = file_identities(params)
    if files is None:
        return None
    images = {"processor": _sha(processor_settings(processor))} if processor is not None else {}
    return images | {
        "format_version": FORMAT_VERSION,
        "method": params.trainer,
        "files": files,
        "tokenizer": tokenizer_hash(tokenizer),
        "builtin_templates": {name: _sha(builtin_template(name)) for name in BUILTIN},
        "template_files": template_files(params),
        "tool_files": tool_files(params),
        "options": {name: getattr(params, name) for name in DATA_FIELDS},
        # which rows a mixture's fractions draw, and which examples valid_size holds out
        "seed": params.seed if is_mixture(params.data_path) or params.valid_size is not None else None,
    }


def processor_settings(processor: Any) -> str:
    """A vision-language model's processor settings (LLaVA's patch_size, SmolVLM's image_seq_len) and its image
    processor's (Qwen2-VL's max_pixels): what the tokens of an image depend on."""
    own = processor.to_json_string() if hasattr(processor, "to_json_string") else repr(processor)
    return own + processor.image_processor.to_json_string()


def template_files(params: Any) -> dict[str, str]:
    """A hash of each chat template file the run names (its own, its mixture's sources'): the setting holds only
    the path, and an edited template must not reuse data rendered with the old one (nor resume a run)."""
    names = [getattr(params, "chat_template", None)]  # a classifier has none
    if is_mixture(params.data_path):
        names += [item.get("chat_template") for item in params.data_path if isinstance(item, dict)]
    hashes = {}
    for name in names:
        source = custom_chat_template(name)
        if source is not None and source != name:  # a file (an inline template is in the options already)
            hashes[name] = _sha(source)
    return hashes


def tool_files(params: Any) -> dict[str, str]:
    """A hash of the schemas of the tools the run names: the prompts show them, read from each function's docstring
    and type hints (an edited tool, in a file, a module or a notebook, must not reuse prompts rendered with the old
    schema)."""
    spec = getattr(params, "tools", None)
    if not spec:
        return {}
    from tunelab.tools import load_tools, tool_schemas

    return {"schemas": _sha(json.dumps(tool_schemas(load_tools(spec)), sort_keys=True, default=str))}


def data_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


def tokenizer_hash(tokenizer: Any) -> str:
    """A hash of all a tokenizer does to text: its backend's serialized state (fast tokenizers: vocabulary, merges,
    normalizer, pre-tokenizer, post-processor, added tokens), its special tokens and its own chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = {
        "class": type(tokenizer).__name__,
        "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "chat_template": getattr(tokenizer, "chat_template", None),
        "split_special_tokens": getattr(tokenizer, "split_special_tokens", False),
    }
    return _sha(state + json.dumps(extra, sort_keys=True, default=str))


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


def file_identities(params: Any) -> dict[str, dict[str, Any]] | None:
    """Every data file of the run (each source of a mixture, each split) by "source:split": its path, size and
    sha256; None when the data is a hub dataset."""
    files = {}
    sources = parse_sources(params.data_path) if is_mixture(params.data_path) else [None]
    for number, source in enumerate(sources, start=1):
        read = source.params(params) if source else params
        for split, place in locate_splits(read.data_path, read.train_split, read.valid_split).items():
            if not isinstance(place, Path):
                return None
            try:
                files[f"{number}:{split}"] = _file_identity(place)
            except OSError as err:  # hashed before the readers see the file: the same one line they would give
                raise unreadable(place, err) from None
    return files


def data_fingerprint(files: dict[str, dict[str, Any]] | None, templates: dict[str, str] | None = None) -> str | None:
    """One sha256 of the bytes of the run's data files (`file_identities`) and of the chat template files it names
    (`template_files`: the rows are rendered through them), or None for a hub dataset: what an interrupted run must
    find unchanged to be resumed. Contents only, not paths: the same files reached from another folder are the same
    data."""
    if files is None:
        return None
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}:{files[name]['sha256']}|".encode())
    for name in sorted(templates or {}):
        digest.update(f"template:{templates[name]}|".encode())
    return digest.hexdigest()


def _file_identity(path: Path) -> dict[str, Any]:
    resolved = path.resolve()
    stat = resolved.stat()
    if resolved.is_dir():  # a folder of Parquet parts: every file in it
        digest = hashlib.sha256()
        for part in sorted(p for p in resolved.rglob("*") if p.is_file()):
            digest.update(f"{part.relative_to(resolved)}|{_file_sha(part)}".encode())
        return {"path": str(resolved), "sha256": digest.hexdigest()}
    return {"path": str(resolved), "size": stat.st_size, "sha256": _file_sha(resolved)}


def _file_sha(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


@dataclasses.dataclass
class Entry:
    """One run's place in the cache: `hit` with `bundle` loaded, or `folder` to build into, then `save`."""

    key: str | None  # None: not cached (no_cache, or a hub dataset)
    folder: Path  # where the tables are (hit) or go (miss)
    final: Path | None
    inputs: dict[str, Any] | None
    bundle: dict[str, Any] | None = None
    started: float = dataclasses.field(default_factory=time.time)
    warnings: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    reuse_seconds: float = 0.0  # hashing the inputs, waiting for the lock, opening the entry

    @property
    def hit(self) -> bool:
        """Whether the data was found prepared (final is None: nothing to move into place)."""
        return self.key is not None and self.final is None

    def save(self, bundle: dict[str, Any]) -> None:
        """Keep what was prepared (the tables are already in `folder`) and, when cached, move it into place."""
        bundle = {**bundle, "seconds": round(time.time() - self.started, 1), "warnings": self.warnings}
        self.bundle = bundle
        if self.final is None:
            return
        with open(self.folder / "prepared.pkl", "wb") as file:
            pickler = _Pickler(file)
            pickler.dump(bundle)
        (self.folder / "inputs.json").write_text(json.dumps(self.inputs, indent=1, default=str), encoding="utf-8")
        os.replace(self.folder, self.final)
        for table in pickler.tables:  # their memory maps still read the moved files; their own paths move with them
            if table.folder == self.folder:
                table.folder = self.final
        self.folder = self.final

    def describe(self) -> str:
        """The line the log and the dry run show."""
        seconds = self.bundle["seconds"] if self.bundle else 0
        if self.key is None:
            return f"prepared data: prepared in {seconds} s (not cached)"
        if self.final is None:
            return (
                f"prepared data: reused {self.key} in {self.reuse_seconds:.2f} s (prepared in {seconds} s; "
                f"cache {self.folder.parent})"
            )
        return f"prepared data: prepared in {seconds} s, cached as {self.key} (cache {self.folder.parent})"


@contextlib.contextmanager
def entry_for(params: Any, tokenizer: Any, processor: Any = None) -> Iterator[Entry]:
    """The cache entry of these parameters, held under a lock while it is looked up or built (another process
    preparing the same data is waited for, then its entry is reused)."""
    started = time.time()
    root = _writable(cache_root(params))
    inputs = key_inputs(params, tokenizer, processor) if root is not None else None
    if root is None or inputs is None:
        folder = Path(tempfile.mkdtemp(prefix="tunelab-data-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        with _captured_warnings() as warnings:
            entry = Entry(None, folder, None, None, warnings=warnings)
            yield entry
        return
    key = data_key(inputs)
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        final = root / key
        bundle = _load(final)
        if bundle is not None:
            entry = Entry(key, final, None, inputs, bundle, reuse_seconds=time.time() - started)
            for level, message in bundle["warnings"]:
                log.log(level, "%s", message)
            yield entry
            return
        building = root / f".{key}.building"  # a dead process's leftovers: nobody else holds the lock
        shutil.rmtree(building, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        building.mkdir()
        try:
            with _captured_warnings() as warnings:
                entry = Entry(key, building, final, inputs, started=started, warnings=warnings)
                yield entry
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            raise TunelabError(
                f"no space left for the prepared data in {root} (its token tables take about 5 bytes per token): "
                "free some space (old entries there may be deleted), set cache_dir to another disk, or use "
                "--no-cache"
            ) from None
        finally:
            shutil.rmtree(building, ignore_errors=True)


def _writable(root: Path | None) -> Path | None:
    """The cache folder, created if need be; None (prepare without a cache, with a warning) if it cannot be."""
    if root is None:
        return None
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        log.warning("the prepared-data cache %s cannot be written (%s): preparing without it", root, err.strerror)
        return None
    return root


def _load(folder: Path) -> dict[str, Any] | None:
    try:
        with open(folder / "prepared.pkl", "rb") as file:
            return _Unpickler(file, folder).load()
    except FileNotFoundError:
        return None
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError, KeyError, ValueError) as err:
        log.warning("prepared data in %s cannot be read (%s): preparing it again", folder, err)
        return None


class _Pickler(pickle.Pickler):
    """Token tables are stored as their files, named in the pickle by their split; image bytes stored beside them
    (data/images.StoredImage) by their name in the entry's folder."""

    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self.tables: list[TokenTable] = []

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, TokenTable) and obj.name is not None:
            self.tables.append(obj)
            return ("table", obj.name)
        if isinstance(obj, StoredImage) and obj.name:
            return ("image", obj.name)
        return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: Any, folder: Path) -> None:
        super().__init__(file)
        self.folder = folder

    def persistent_load(self, pid: Any) -> Any:
        kind, name = pid
        if kind == "image":
            if not (self.folder / name).is_file():
                raise ValueError(f"stored image {name} is missing")
            return StoredImage(str(self.folder / name), name)
        if kind != "table":
            raise pickle.UnpicklingError(f"unknown stored object {kind!r}")
        return TokenTable.open(self.folder, name)


@contextlib.contextmanager
def _captured_warnings() -> Iterator[list[tuple[int, str]]]:
    """The warnings the preparation logs (bad rows skipped, ...), kept to be logged again when it is reused."""
    captured: list[tuple[int, str]] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            captured.append((record.levelno, record.getMessage()))

    handler = Keep(logging.WARNING)
    log.addHandler(handler)
    try:
        yield captured
    finally:
        log.removeHandler(handler)
