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

Drawing the masks is most of dropout's cost on a CPU (one random number per element), so there they are drawn the
other way round: as the positions of the dropped elements, from the geometric gaps between them
(`dropped_positions`, the same Bernoulli process with about p * n random numbers for n elements). Up to
p = 1/8, those positions (8 bytes each) are kept instead of the 1-byte mask (less memory), and applying them writes
zeros at p * n places instead of multiplying n. Drawing for a 768 x 576 input at p = 0.05 on this project's CPU:
0.56 ms as a mask, 0.15 ms as positions (768 x 1536: 1.57 and 0.34 ms); 7 draws per Llama layer.
On a GPU, and for larger p, the masks are 0/1 bytes made from 16-bit slices of 64-bit random words: one draw of the
generator serves four mask elements. p is then rounded to a multiple of 1/65536 (0.05 becomes 0.0500031), and the
scale uses the rounded p, so the dropped input stays unbiased.

The LoRA module's own forward is replaced too (`_lora_forward`) for the plain case: PEFT computes
`base(x) + lora_B(h) * scaling`, two more passes over the full-width output (the product and the sum) and a third
in the backward pass. Here the scaling is applied to the rank-r `h` (already scaled by 1 / (1 - p)) and the sum
happens inside lora_B's matrix multiply (`addmm`, which adds the base output as it writes): the same numbers up to
rounding, no full-width extra pass. Anything else (adapters disabled or merged, several adapters, a LoRA variant,
a bias on lora_B, no gradients) goes through PEFT's forward unchanged.
"""

from __future__ import annotations

import math
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


# Up to this p the dropped positions (int64) take no more memory than a 1-byte mask, and are cheaper to draw and apply.
POSITIONS_UP_TO = 1 / 8


def dropped_positions(n: int, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Flat positions (int64, ascending) of the elements dropped from n, each independently with probability p.

    The number of kept elements before each drop is geometric, P(k) = (1 - p)^k p, so the positions are running
    sums of floor(log(1 - u) / log(1 - p)) + 1 for uniform u: about n * p random numbers, not n. (u has 24 random
    bits, which cuts the gaps off where (1 - p)^k < 2^-24: for p = 0.05, 6e-8 of them.)"""
    log_keep = math.log1p(-p)
    parts, start = [], 0
    while start < n:  # one round almost always covers n: the margin is 6 standard deviations
        left = n - start
        count = int(left * p + 6 * math.sqrt(left * p * (1 - p))) + 16
        gaps = torch.floor(torch.log1p(-torch.rand(count, device=device)) / log_keep).long()
        positions = torch.cumsum(gaps + 1, 0) + (start - 1)
        inside = int(torch.searchsorted(positions, n).item())  # ascending: the ones below n come first
        parts.append(positions[:inside])
        start = int(positions[-1].item()) + 1
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _dropped(t: torch.Tensor, drop: torch.Tensor | None, in_place: bool = False) -> torch.Tensor:
    """t with the dropped elements zeroed: `drop` is None (nothing dropped), a 0/1 keep-mask of t's shape (uint8),
    or the flat positions of the dropped elements (int64)."""
    if drop is None:
        return t
    if drop.dtype != torch.int64:
        return t * drop
    if not (in_place and t.is_contiguous()):
        t = t.clone(memory_format=torch.contiguous_format)
    t.view(-1).index_fill_(0, drop, 0)
    return t


class _DroppedProjection(torch.autograd.Function):
    """out = (dropped(x) @ weight.T) * scale, saving x (or its Rebuild's inputs) and the dropped positions or 1-byte
    mask instead of the dropped copy. drop is None without dropout."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, drop: torch.Tensor | None, weight: torch.Tensor, scale: float
    ) -> torch.Tensor:
        # PEFT casts x to the adapter's dtype first; fuse_lora_dropout turns that off, so a half-precision x is kept
        # once, as it is, not as a cast copy per module. The product is computed in that dtype, or autocast's.
        autocast = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else weight.dtype
        ctx.x_dtype = x.dtype
        rebuild = rebuild_of(x)
        if rebuild is None:
            ctx.rebuilt = None
            ctx.save_for_backward(x, drop, weight)
        else:  # x is a fused norm's or SwiGLU's output: keep what rebuilds it, which that layer keeps anyway
            ctx.rebuilt = rebuild.value
            rebuild.value.readers += 1
            ctx.save_for_backward(*rebuild.inputs, drop, weight)
        ctx.scale = scale
        with torch.autocast(x.device.type, enabled=False):
            return torch.nn.functional.linear(_dropped(x, drop).to(dtype), weight.to(dtype)) * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None, None]:
        *inputs, drop, weight = ctx.saved_tensors
        grad = grad * ctx.scale
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = _dropped(grad @ weight.to(grad.dtype), drop, in_place=True).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            x = inputs[0] if ctx.rebuilt is None else ctx.rebuilt.get(tuple(inputs))
            dropped = _dropped(x, drop).to(grad.dtype)
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

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """lora_A(dropout(x)) * scale (LoRA's scaling, folded in by `_lora_forward`)."""
        if not torch.is_grad_enabled() or not self.weight.requires_grad:
            out = nn.functional.linear(x.to(self.weight.dtype), self.weight)
            return out if scale == 1.0 else out * scale
        if not self.training or self.p == 0:
            return _DroppedProjection.apply(x, None, self.weight, scale)
        # Compiled layers take the mask: the positions' draw reads two numbers back (.item()), a graph break each.
        if x.device.type == "cpu" and self.p <= POSITIONS_UP_TO and not torch.compiler.is_compiling():
            return _DroppedProjection.apply(x, dropped_positions(x.numel(), self.p), self.weight, scale / (1 - self.p))
        keep = keep_mask(x, self.p)
        return _DroppedProjection.apply(x, keep, self.weight, scale / (1.0 - drop_probability(self.p)))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dropout={self.p}"


def _lora_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A PEFT LoRA Linear's forward with lora_B's product added inside its matrix multiply (see the top)."""
    adapters = self.active_adapters
    name = adapters[0] if len(adapters) == 1 else None
    lora_a = self.lora_A[name] if name in self.lora_A else None
    lora_b = self.lora_B[name] if name in self.lora_B else None
    plain = (
        not args
        and not kwargs
        and not self.disable_adapters
        and not self.merged
        and isinstance(lora_a, DropoutLoraA)
        and name not in self.lora_variant
        and type(lora_b) is nn.Linear
        and lora_b.bias is None
        # DeepSpeed ZeRO-3 gathers a module's weights in hooks around its own forward, which this one skips for B
        and not hasattr(lora_b.weight, "ds_id")
        and torch.is_grad_enabled()
        # addmm takes one dtype: autocast casts all three, else x must already be the adapter's
        and (torch.is_autocast_enabled(x.device.type) or x.dtype == lora_b.weight.dtype)
    )
    if not plain:
        return type(self).forward(self, x, *args, **kwargs)
    hidden = lora_a(x, self.scaling[name])  # x itself: a view of it would lose the fused layers' rebuild recipe
    # The base projection of the flattened x is a fresh 2-D tensor that its backward pass does not need, so lora_B's
    # product can be added into it in place.
    result = self.base_layer(x.reshape(-1, x.shape[-1]))
    # In place, autocast casts nothing: the float32 B meets a half-precision output as autocast would have cast it.
    result.addmm_(hidden.reshape(-1, hidden.shape[-1]).to(result.dtype), lora_b.weight.t().to(result.dtype))
    return result.view(*x.shape[:-1], result.shape[-1])


def fuse_lora_dropout(model: nn.Module) -> int:
    """Fold every LoRA module's dropout (p >= 0) into its lora_A, in place. Returns how many modules were changed.

    Only plain LoRA linear layers are touched; DoRA and other variants keep PEFT's path.
    """
    from peft.tuners.lora.layer import Linear as LoraLinear

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
            if type(module) is LoraLinear:  # not MoE ParamWrappers or quantized layers: their forwards differ
                module.forward = _lora_forward.__get__(module)
    return changed
