"""RMSNorm and SwiGLU as autograd functions that keep only their inputs for the backward pass.

Written op by op (as transformers' Llama-family modules are), autograd keeps every intermediate: RMSNorm keeps
its input, the normalised input and the output; SwiGLU keeps gate, up and silu(gate). Here RMSNorm keeps its
input and one number per token, SwiGLU keeps gate and up, and the backward pass recomputes the rest (a few
elementwise ops). Same maths, same dtypes as transformers' modules; about a quarter less activation memory per
decoder layer. `fuse_layers` swaps them into a model in place; nothing about the weights or saved files changes.

Their outputs are cheap to rebuild from the inputs they keep, so each output carries a `Rebuild` recipe. A LoRA
projection that reads it (lora_dropout.py) keeps the recipe's inputs, which are alive until this layer's own
backward pass anyway, instead of the output: under LoRA the normed inputs of q/k/v and gate/up and the SwiGLU
product (down_proj's input) are then not kept at all (the frozen base projections keep only their weights).
That is another quarter of a LoRA layer's activations, for one elementwise op per output in the backward pass.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Rebuild:
    """How to rebuild a tensor in the backward pass: `fn(*inputs)`. Readers save `inputs` (through
    save_for_backward, so activation checkpointing sees them) and share one `RebuiltValue`, so the output is
    rebuilt once however many projections read it (q, k and v read the same normed input)."""

    def __init__(self, fn: Any, *inputs: torch.Tensor) -> None:
        self.fn, self.inputs = fn, inputs
        self.value = RebuiltValue(fn)


class RebuiltValue:
    """The rebuilt tensor, held from the first reader's backward pass until the last reader is done. It holds no
    tensor before that: a reference to the inputs here would keep them alive past activation checkpointing."""

    def __init__(self, fn: Any) -> None:
        self.fn, self.readers, self._value = fn, 0, None

    def get(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if self._value is None:
            with torch.no_grad():
                self._value = self.fn(*inputs)
        return self._value

    def release(self) -> None:
        self.readers -= 1
        if self.readers <= 0:
            self._value = None


def rebuild_of(x: torch.Tensor) -> Rebuild | None:
    """The recipe a fused layer attached to its output, if x is such an output."""
    return getattr(x, "_tunelab_rebuild", None)


def _with_rebuild(out: torch.Tensor, fn: Any, *inputs: torch.Tensor) -> torch.Tensor:
    if not torch.compiler.is_compiling():  # compiled layers plan their own memory
        out._tunelab_rebuild = Rebuild(fn, *inputs)
    return out


def _normalise(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    return weight * (x.float() * rstd).to(x.dtype)


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return nn.functional.silu(gate) * up


class _RMSNorm(torch.autograd.Function):
    """weight * (x / sqrt(mean(x^2) + eps)), normalised in float32 and cast back, as LlamaRMSNorm does.

    Also returns rstd (one float per token, not differentiable), which a Rebuild of the output needs."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.mark_non_differentiable(rstd)
        return weight * (x32 * rstd).to(x.dtype), rstd  # _normalise, without a second float copy of x

    @staticmethod
    def backward(
        ctx: Any, grad: torch.Tensor, _grad_rstd: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:
            product = grad * normed.to(x.dtype)
            grad_weight = product.reshape(-1, product.shape[-1]).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            grad_normed = (grad * weight).float()
            grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_weight, None


class _SiluMul(torch.autograd.Function):
    """silu(gate) * up, the SwiGLU product."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return _silu_mul(gate, up)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        silu = gate * sig
        grad_up = grad * silu
        grad_gate = grad * up * (sig * (1 + gate * (1 - sig)))
        return grad_gate, grad_up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    out, rstd = _RMSNorm.apply(x, weight, eps)
    return out if out.grad_fn is None else _with_rebuild(out, _normalise, x, weight, rstd)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    out = _SiluMul.apply(gate, up)
    return out if out.grad_fn is None else _with_rebuild(out, _silu_mul, gate, up)


def _norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


# Model families whose RMSNorm and MLP forwards are exactly transformers' Llama ones (checked against their
# source); other models keep their own forwards.
FAMILIES = ("Llama", "Mistral", "Qwen2", "Qwen3", "SmolLM3")


def _is_llama_rms_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return name in {f"{family}RMSNorm" for family in FAMILIES} and hasattr(module, "variance_epsilon")


def _is_swiglu_mlp(module: nn.Module) -> bool:
    name = type(module).__name__
    act = type(getattr(module, "act_fn", None)).__name__
    return name in {f"{family}MLP" for family in FAMILIES} and act in ("SiLU", "SiLUActivation")


def _turn_off_hub_kernels(model: nn.Module) -> None:
    """transformers >= 5.25 loads models with `use_kernels` on (its `kernels` package is a dependency there), and
    every train() or eval() then re-kernelizes: each decorated layer (RMSNorm among them) gets its class's forward
    back, or a hub kernel's, dropping the fused forward set below without a word. These layers are tunelab's to
    fuse, so kernelization is turned off first (which itself resets forwards, hence before fusing)."""
    for module in model.modules():
        if getattr(module, "use_kernels", False) is True:
            module.use_kernels = False


def fuse_layers(model: nn.Module) -> tuple[int, int]:
    """Give every Llama-style RMSNorm and SwiGLU MLP in `model` the fused forward. Returns (norms, mlps)."""
    _turn_off_hub_kernels(model)
    norms = mlps = 0
    for module in model.modules():
        if _is_llama_rms_norm(module):
            module.forward = _norm_forward.__get__(module)
            norms += 1
        elif _is_swiglu_mlp(module):
            module.forward = _mlp_forward.__get__(module)
            mlps += 1
    return norms, mlps
