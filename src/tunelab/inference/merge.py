"""`tunelab merge`: a LoRA run folder -> one full model (adapter merged into its base) that plain transformers loads.

The result is in the base's own dtype (a GGUF base is dequantized to float32), or in `dtype` when given; either
way each merged weight is rounded once, from the float32 sum of the weight and its update. It is written to
`<output>.partial` then renamed: a failed merge never leaves a folder that looks finished. Only causal language
models are merged: a reward or text-classification run is a sequence classifier.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.outputs import base_model_of, check_run_folder, load_base, read_run

log = logging.getLogger("tunelab")
DTYPES = ("float32", "float16", "bfloat16")


def merge_run(path: str | Path, output: str | Path, dtype: str | None = None) -> Path:
    """Merge the LoRA adapter of a run folder into its base model and save the full model (and tokenizer)."""
    import torch

    from tunelab.models.load import ModelSource, load_tokenizer
    from tunelab.models.peft import load_adapter, merge_into_base

    folder = check_run_folder(path, "merge")
    check_causal_lm_run(folder, "merge")
    if not (folder / "adapter_config.json").is_file():
        raise TunelabError(f"merge: {folder} holds full model weights already (no LoRA adapter to merge)")
    if dtype is not None and dtype not in DTYPES:
        raise TunelabError(f"merge: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    target = Path(os.path.expanduser(str(output))).absolute()
    if target.exists():
        raise TunelabError(f"merge: {target} already exists: choose another --output or remove it")

    log.info("merging the adapter in %s into %s", folder, base_model_of(folder))
    base = load_base(folder)
    wanted = getattr(torch, dtype) if dtype else base.dtype
    # Into the base's own dtype the merge is done in place: PEFT loads the adapter in float32 and adds each float32
    # update into its weight, rounding once, which gives the bits of a float32 merge cast at the end without a
    # float32 copy of the model (half the memory or less). Into any other dtype it goes through float32: merged
    # in a bfloat16 base's precision and then widened, a LoRA update smaller than half a weight's rounding step
    # would be lost in the merge and in every export made from it, f32 included.
    merged = merge_into_base(load_adapter(base if wanted == base.dtype else base.float(), folder)).to(wanted)
    tokenizer = load_tokenizer(ModelSource(str(folder), str(folder)))
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        save_full_model(merged, tokenizer, staging)
        for name in PROCESSOR_FILES:  # a vision-language run's image processor, beside the model it feeds
            if (folder / name).is_file():
                shutil.copyfile(folder / name, staging / name)
        os.replace(staging, target)
    except OSError as error:  # a full disk, a read-only folder: the path, not a traceback
        raise TunelabError(f"merge: cannot write {target}: {error.strerror or error}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone after the rename; left only by a failure
    log.info("merged model (%s) written to %s", next(merged.parameters()).dtype, target)
    return target


# What a vision-language model's processor saves beside the tokenizer (transformers 5 writes processor_config.json;
# older processors preprocessor_config.json and chat_template.json).
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "chat_template.json")


def check_causal_lm_run(folder: Path, command: str) -> None:
    """One TunelabError when the run folder holds a sequence classifier (a reward or text-classification run):
    merging its adapter onto a causal LM would drop its score head and give a model it never was."""
    trainer = read_run(folder).get("trainer")
    if trainer == "reward":
        raise TunelabError(
            f"{command}: {folder} is a reward model (a sequence classifier that scores texts, tunelab score); "
            f"{command} takes causal language models"
        )
    if trainer == "text_classification":
        merged = " (its merged/ folder holds the full classifier)" if (folder / "merged").is_dir() else ""
        raise TunelabError(f"{command}: {folder} is a text classifier{merged}; {command} takes causal language models")


def save_full_model(model: Any, tokenizer: Any, folder: Path) -> None:
    """A plain transformers model folder (safetensors, config without training-only settings, tokenizer)."""
    from tunelab.models.turns import mark_turn_end

    model.config.use_cache = True  # trained with the cache off; the merged model is for generation
    mark_turn_end(model, tokenizer)  # other runtimes stop where the template ends a turn
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
