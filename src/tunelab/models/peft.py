"""Wrapping a model with a LoRA adapter (PEFT), including k-bit preparation for QLoRA."""

from __future__ import annotations

import warnings
from typing import Any


def target_modules(spec: str | None) -> str | list[str]:
    """'all-linear' (PEFT's shortcut: every linear layer but the output head) or a comma-separated list."""
    if spec is None or spec.strip() in ("", "all-linear", "all_linear"):
        return "all-linear"
    return [name.strip() for name in spec.split(",") if name.strip()]


def lora_config(params: Any, task_type: str = "CAUSAL_LM") -> Any:
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


def add_lora(model: Any, params: Any, task_type: str = "CAUSAL_LM") -> Any:
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
