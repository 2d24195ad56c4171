"""LoRA's input dropout fused into its first projection, without the copies PEFT keeps.

PEFT computes `lora_B(lora_A(dropout(x)))`: every LoRA module draws a float noise tensor the size of its input,
stores it, and stores the dropped input for `lora_A`'s weight gradient, two full-size float copies per module
(seven modules per Llama layer). On a CPU the draws alone cost as much as the layer's matrix multiplies.

`DropoutLoraA` replaces the pair (dropout, lora_A) with one autograd function that draws a boolean keep-mask
(1 byte per element), keeps only that mask and the input (which the modules sharing that input keep once), and
rebuilds the dropped input in the backward pass. The maths is PEFT's: each module still draws its own
independent mask with keep-probability 1 - p, and the surviving inputs are scaled by 1 / (1 - p) (applied to
the rank-r output, where it is cheapest). The adapter's weights keep their names, so saved adapters, merging
and reloading are unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A boolean mask of x's shape, each element True with probability 1 - p."""
    return torch.rand(x.shape, device=x.device) >= p


class _DroppedProjection(torch.autograd.Function):
    """out = ((x * keep) @ weight.T) * scale, saving x and the boolean mask instead of the dropped copy."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, keep: torch.Tensor, weight: torch.Tensor, scale: float) -> torch.Tensor:
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        ctx.save_for_backward(x, keep, weight)
        ctx.scale = scale
        with torch.autocast(x.device.type, enabled=False):
            return torch.nn.functional.linear((x * keep).to(dtype), weight.to(dtype)) * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None, None]:
        x, keep, weight = ctx.saved_tensors
        grad = grad * ctx.scale
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = ((grad @ weight.to(grad.dtype)) * keep).to(x.dtype)
        if ctx.needs_input_grad[2]:
            dropped = (x * keep).to(grad.dtype)
            grad_weight = (grad.reshape(-1, grad.shape[-1]).T @ dropped.reshape(-1, dropped.shape[-1])).to(
                weight.dtype
            )
        return grad_x, None, grad_weight, None


class DropoutLoraA(nn.Module):
    """PEFT's lora_A (an nn.Linear without bias) with its input dropout folded in. Holds the same `weight`."""

    def __init__(self, linear: nn.Linear, p: float) -> None:
        super().__init__()
        self.weight = linear.weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return nn.functional.linear(x, self.weight)
        return _DroppedProjection.apply(x, keep_mask(x, self.p), self.weight, 1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dropout={self.p}"


def fuse_lora_dropout(model: nn.Module) -> int:
    """Fold every LoRA module's dropout into its lora_A, in place. Returns how many modules were changed.

    Only plain LoRA linear layers with dropout > 0 are touched; DoRA and other variants keep PEFT's path.
    """
    changed = 0
    for module in model.modules():
        dropouts, lora_a = getattr(module, "lora_dropout", None), getattr(module, "lora_A", None)
        if not isinstance(dropouts, nn.ModuleDict) or not isinstance(lora_a, nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            linear = lora_a[name] if name in lora_a else None
            variant = getattr(module, "lora_variant", {})
            if not isinstance(dropout, nn.Dropout) or dropout.p == 0 or name in variant:
                continue
            if type(linear) is not nn.Linear or linear.bias is not None:
                continue
            lora_a[name] = DropoutLoraA(linear, dropout.p)
            dropouts[name] = nn.Identity()
            changed += 1
    return changed
