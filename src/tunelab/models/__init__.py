"""The model step of a run: resolve where the base model is, load it in the right dtype, add LoRA if asked."""

from __future__ import annotations

import logging
from typing import Any

from tunelab.models.load import (
    ModelSource,
    load_causal_lm,
    load_config,
    load_sequence_classifier,
    load_tokenizer,
    resolve_model,
)
from tunelab.models.peft import add_lora
from tunelab.models.quantize import check_quantization, quantization_config
from tunelab.speed import attention_implementation, fuse_ops

__all__ = ["ModelSource", "load_model", "load_tokenizer", "resolve_model", "load_config", "check_quantization"]

log = logging.getLogger("tunelab")


def load_model(source: ModelSource, params: Any, kind: str = "causal_lm", tokenizer: Any = None) -> Any:
    """Base model for training: fp32 weights for full fine-tuning (mixed precision autocasts), the half type for
    LoRA under mixed precision (the frozen base never needs fp32), int4/int8 for QLoRA.

    kind "reward": a sequence classifier with one output (its pad token set from the tokenizer, which it needs
    to find each row's last token)."""
    import torch

    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(params.mixed_precision or "")
    dtype = half if (params.peft and half is not None) else torch.float32
    kwargs: dict[str, Any] = {}
    attention = attention_implementation(params)
    if attention:
        kwargs["attn_implementation"] = attention
    quantization = quantization_config(params.quantization, half)
    if kind == "reward":
        model = load_sequence_classifier(source, 1, dtype=dtype, quantization_config=quantization, **kwargs)
        if tokenizer is not None:
            model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model = load_causal_lm(source, dtype=dtype, quantization_config=quantization, **kwargs)
    model.config.use_cache = False  # the KV cache is useless while training and conflicts with checkpointing
    if params.peft:
        model = add_lora(model, params, task_type="SEQ_CLS" if kind == "reward" else "CAUSAL_LM")
    fuse_ops(model, params)
    return model
