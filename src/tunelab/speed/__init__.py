"""The hot path: every performance switch in one place (this table), and the kernels it switches (beside it).

| switch | default | what |
| --- | --- | --- |
| fast_loss | on | loss from hidden states, answer positions only, in chunks (speed/loss.py): no full logits |
| batches | always | length-grouped rows or pairs, or packed rows with per-example positions (data/packing.py) |
| row padding | always | to a multiple of 8 on a GPU, of 1 on a CPU (pad_multiple) |
| fused optimizer | CUDA, CPU | adamw_torch -> adamw_torch_fused (same maths, one kernel per parameter) |
| fused_ops | on | RMSNorm, SwiGLU (fused_layers.py), LoRA dropout and forward (lora_dropout.py); LoRA rebuilds |
| torch_compile | off | each decoder layer compiled with torch.compile (one graph, reused by every layer) |
| attention | sdpa | flash_attention_2 with use_flash_attention_2 (CUDA, flash-attn installed) |

Called by models/__init__.load_model (attention kernels, fused ops), training/trainer.py (optimizer, compile, the
loss) and methods/preference.py (the pair losses' log-probs); nothing else decides about speed. The modules
beside this one import torch; this one does not, so `tunelab --help` stays fast.
"""

from __future__ import annotations

import logging
from typing import Any

from tunelab.config.base import RunParams

log = logging.getLogger("tunelab")


def attention_implementation(params: RunParams) -> str | None:
    """The attention kernels to load the model with (None: transformers' default, SDPA)."""
    return "flash_attention_2" if params.use_flash_attention_2 else None


def pad_multiple() -> int:
    """What a batch's row length is rounded up to: 8 on a GPU (tensor-core tiles), 1 on a CPU, where a pad token
    costs as much as a real one and buys nothing (multiples of 8 were 2-3% of the tokens of a CPU step)."""
    import torch

    return 8 if torch.cuda.is_available() else 1


def optimizer_name(params: RunParams) -> str:
    """AdamW in its fused form: the same updates, one kernel per parameter instead of a dozen ops. tunelab trains on
    a CUDA GPU or else on the CPU (where a LoRA r16 step over SmolLM2's 420 adapter matrices takes 6.7-7.4 ms instead
    of 23-26), both of which have it."""
    if params.optimizer == "adamw_torch":
        return "adamw_torch_fused"
    return params.optimizer


def decoder_layers(model: Any) -> Any:
    """The repeated transformer blocks of a (possibly PEFT-wrapped) causal LM, or None if not found."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    for owner in (decoder, getattr(base, "model", None), getattr(base, "transformer", None)):
        for name in ("layers", "h", "blocks"):
            layers = getattr(owner, name, None)
            if isinstance(layers, torch.nn.ModuleList):
                return layers
    return None


def compile_layers(model: Any) -> int:
    """torch.compile every decoder layer in place (dynamic shapes: batches vary in length). Returns how many."""
    layers = decoder_layers(model)
    if layers is None:
        log.warning("torch_compile: no decoder layers found in %s; running uncompiled", type(model).__name__)
        return 0
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def fuse_ops(model: Any, params: RunParams) -> None:
    """Swap in the memory-lean RMSNorm, SwiGLU and LoRA dropout when `fused_ops` is on."""
    from tunelab.speed.fused_layers import fuse_layers
    from tunelab.speed.lora_dropout import fuse_lora_dropout

    if not params.fused_ops:
        return
    norms, mlps = fuse_layers(model)
    loras = fuse_lora_dropout(model) if params.peft else 0
    log.debug("fused_ops: %d RMSNorm, %d SwiGLU MLP, %d LoRA dropout modules", norms, mlps, loras)
    if params.peft and params.use_dora:
        log.info("fused_ops: DoRA layers keep PEFT's own forward (the fused LoRA dropout serves plain LoRA layers)")
    if not norms and not mlps:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        log.info("fused_ops: no fused RMSNorm/SwiGLU for %s models; their layers run unchanged", model_type)
