"""`tunelab merge`: a LoRA run folder -> one full model (adapter merged into its base) that plain transformers loads.

The base is loaded in its own dtype (a GGUF base is dequantized to float32, or to `dtype` when given), the adapter
merged into its weights, and the result written to `<output>.partial` then renamed: a failed merge never leaves a
folder that looks finished.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.outputs import base_model_of, check_run_folder

log = logging.getLogger("tunelab")
DTYPES = ("float32", "float16", "bfloat16")


def merge_run(path: str | Path, output: str | Path, dtype: str | None = None) -> Path:
    """Merge the LoRA adapter of a run folder into its base model and save the full model (and tokenizer)."""
    import torch

    from tunelab.models.load import ModelSource, load_causal_lm, load_tokenizer, resolve_model
    from tunelab.models.peft import load_adapter, merge_into_base

    folder = check_run_folder(path, "merge")
    if not (folder / "adapter_config.json").is_file():
        raise TunelabError(f"merge: {folder} holds full model weights already (no LoRA adapter to merge)")
    if dtype is not None and dtype not in DTYPES:
        raise TunelabError(f"merge: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    target = Path(os.path.expanduser(str(output))).absolute()
    if target.exists():
        raise TunelabError(f"merge: {target} already exists: choose another --output or remove it")

    base_name = base_model_of(folder)
    log.info("merging the adapter in %s into %s", folder, base_name)
    base = load_causal_lm(resolve_model(base_name), dtype=getattr(torch, dtype) if dtype else None)
    merged = merge_into_base(load_adapter(base, folder))
    tokenizer = load_tokenizer(ModelSource(str(folder), str(folder)))
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        save_full_model(merged, tokenizer, staging)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("merged model (%s) written to %s", next(merged.parameters()).dtype, target)
    return target


def save_full_model(model: Any, tokenizer: Any, folder: Path) -> None:
    """A plain transformers model folder (safetensors, config without training-only settings, tokenizer)."""
    from tunelab.models.turns import mark_turn_end

    model.config.use_cache = True  # trained with the cache off; the merged model is for generation
    mark_turn_end(model, tokenizer)  # other runtimes stop where the template ends a turn
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
