"""Wrapping a model with a LoRA adapter (PEFT), including k-bit preparation for QLoRA."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

from tunelab.config.base import RunParams


def target_modules(spec: str | None) -> str | list[str]:
    """'all-linear' (PEFT's shortcut: every linear layer but the output head) or a comma-separated list."""
    if spec is None or spec.strip() in ("", "all-linear", "all_linear"):
        return "all-linear"
    return [name.strip() for name in spec.split(",") if name.strip()]


def lora_config(params: RunParams, task_type: str = "CAUSAL_LM") -> Any:
    """The PEFT LoraConfig the params describe (also handed to TRL by the benchmark, so both sides match)."""
    from peft import LoraConfig

    return LoraConfig(
        r=params.lora_r,
        lora_alpha=params.lora_alpha,
        lora_dropout=params.lora_dropout,
        target_modules=target_modules(params.target_modules),
        bias="none",
        task_type=task_type,
    )


def add_lora(model: Any, params: RunParams, task_type: str = "CAUSAL_LM") -> Any:
    """Freeze the model and add a LoRA adapter as the params describe."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if params.quantization is not None:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=not params.disable_gradient_checkpointing
        )
    config = lora_config(params, task_type)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*")
        model = get_peft_model(model, config)
    # The model's own name: a GGUF-built model would record the folder of the .gguf file instead.
    model.peft_config["default"].base_model_name_or_path = params.model
    return model


@contextlib.contextmanager
def quiet_peft_save() -> Iterator[None]:
    """Saving an adapter (a checkpoint or the final one), PEFT looks up the base model's config.json, locally or
    on the hub, to see whether the vocabulary changed; a GGUF base has none and an offline machine cannot fetch it,
    and PEFT warns at every save. tunelab never resizes the vocabulary, so the lookup has nothing to tell."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Could not find a config file")
        warnings.filterwarnings("ignore", message="Unable to fetch remote file")
        yield
