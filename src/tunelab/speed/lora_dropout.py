"""LoRA's input dropout fused into its first projection, without the copies PEFT keeps.

PEFT computes `lora_B(lora_A(dropout(x)))`: every LoRA module draws a float noise tensor the size of its input,
stores it, and stores the dropped input for `lora_A`'s weight gradient, two full-size float copies per module
(seven modules per Llama layer). On a CPU the draws alone cost as much as the layer's matrix multiplies.

`DropoutLoraA` replaces the pair (dropout, lora_A) with one autograd function that draws a 0/1 keep-mask
(1 byte per element, uint8), keeps only that mask and the input (which the modules sharing that input keep once), and
rebuilds the dropped input in the backward pass. When the input is the output of a fused RMSNorm or SwiGLU
(fused_layers.py), it keeps that layer's inputs instead, and rebuilds the input too. Modules without dropout
take the same path (no mask), for that saving alone. The maths is PEFT's: each module still draws its own
independent mask with keep-probability 1 - p, and the surviving inputs are scaled by 1 / (1 - p) (applied to
the rank-r output, where it is cheapest). The adapter's weights keep their names, so saved adapters, merging
and reloading are unchanged.

The masks come from 16-bit slices of 64-bit random words: one draw of the generator serves four mask elements
instead of one (`torch.rand` spends a draw per element), which makes the masks 2.7x cheaper on a CPU, where they
were 15% of a LoRA step. p is therefore rounded to a multiple of 1/65536 (0.05 becomes 0.0500031), and the scale
uses the rounded p, so the dropped input stays unbiased.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tunelab.speed.fused_layers import rebuild_of

_LEVELS = 1 << 16  # a mask element is one 16-bit slice of a random word


def _dropped_levels(p: float) -> int:
    return min(round(p * _LEVELS), _LEVELS - 1)  # p < 1 always keeps something


def drop_probability(p: float) -> float:
    """The dropout probability the masks really have: p rounded to a multiple of 1/65536."""
    return _dropped_levels(p) / _LEVELS


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A 0/1 mask of x's shape (one byte an element, uint8), each element 1 with probability 1 - drop_probability(p).

    uint8, not bool: `x * mask` with a bool mask takes PyTorch's slow mixed-dtype path on a CPU (the bool is
    converted element by element: 284 us for a 1024 x 576 fp32 input on this project's CPU), with a uint8 mask the
    vectorized one (60 us); the products are the same numbers. A LoRA layer multiplies by its masks 21 times.
    """
    n = x.numel()
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
    # Each int16 slice is uniform on [-32768, 32768): drop the lowest round(p * 65536) values.
    keep = words.view(torch.int16)[:n].view(x.shape) >= _dropped_levels(p) - _LEVELS // 2
    return keep.view(torch.uint8)  # the same bytes, read as 0/1 numbers


class _DroppedProjection(torch.autograd.Function):
    """out = ((x * keep) @ weight.T) * scale, saving x (or its Rebuild's inputs) and the 1-byte mask instead of
    the dropped copy. keep is None without dropout."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, keep: torch.Tensor | None, weight: torch.Tensor, scale: float
    ) -> torch.Tensor:
        # PEFT casts x to the adapter's dtype first; fuse_lora_dropout turns that off, so a half-precision x is kept
        # once, as it is, not as a cast copy per module. The product is computed in that dtype, or autocast's.
        autocast = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else weight.dtype
        ctx.x_dtype = x.dtype
        rebuild = rebuild_of(x)
        if rebuild is None:
            ctx.rebuilt = None
            ctx.save_for_backward(x, keep, weight)
        else:  # x is a fused norm's or SwiGLU's output: keep what rebuilds it, which that layer keeps anyway
            ctx.rebuilt = rebuild.value
            rebuild.value.readers += 1
            ctx.save_for_backward(*rebuild.inputs, keep, weight)
        ctx.scale = scale
        with torch.autocast(x.device.type, enabled=False):
            dropped = x if keep is None else x * keep
            return torch.nn.functional.linear(dropped.to(dtype), weight.to(dtype)) * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None, None]:
        *inputs, keep, weight = ctx.saved_tensors
        grad = grad * ctx.scale
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ weight.to(grad.dtype)
            grad_x = (grad_x if keep is None else grad_x * keep).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            x = inputs[0] if ctx.rebuilt is None else ctx.rebuilt.get(tuple(inputs))
            dropped = (x if keep is None else x * keep).to(grad.dtype)
            grad_weight = (grad.reshape(-1, grad.shape[-1]).T @ dropped.reshape(-1, dropped.shape[-1])).to(
                weight.dtype
            )
        if ctx.rebuilt is not None:
            ctx.rebuilt.release()
        return grad_x, None, grad_weight, None


class DropoutLoraA(nn.Module):
    """PEFT's lora_A (an nn.Linear without bias) with its input dropout (p may be 0) folded in. Holds the same
    `weight`."""

    def __init__(self, linear: nn.Linear, p: float) -> None:
        super().__init__()
        self.weight = linear.weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not self.weight.requires_grad:
            return nn.functional.linear(x.to(self.weight.dtype), self.weight)
        if not self.training or self.p == 0:
            return _DroppedProjection.apply(x, None, self.weight, 1.0)
        return _DroppedProjection.apply(x, keep_mask(x, self.p), self.weight, 1.0 / (1.0 - drop_probability(self.p)))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dropout={self.p}"


def fuse_lora_dropout(model: nn.Module) -> int:
    """Fold every LoRA module's dropout (p >= 0) into its lora_A, in place. Returns how many modules were changed.

    Only plain LoRA linear layers are touched; DoRA and other variants keep PEFT's path.
    """
    changed = 0
    for module in model.modules():
        dropouts, lora_a = getattr(module, "lora_dropout", None), getattr(module, "lora_A", None)
        if not isinstance(dropouts, nn.ModuleDict) or not isinstance(lora_a, nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            linear = lora_a[name] if name in lora_a else None
            variant = getattr(module, "lora_variant", {})
            if not isinstance(dropout, (nn.Dropout, nn.Identity)) or name in variant:
                continue
            if type(linear) is not nn.Linear or linear.bias is not None:
                continue
            lora_a[name] = DropoutLoraA(linear, getattr(dropout, "p", 0.0))
            dropouts[name] = nn.Identity()
            changed += 1
        if all(isinstance(a, DropoutLoraA) for a in lora_a.values()):
            module.cast_input_dtype_enabled = False  # DropoutLoraA casts, without keeping the cast copy
    return changed
