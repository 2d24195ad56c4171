"""RMSNorm and SwiGLU as autograd functions that keep only their inputs for the backward pass.

Written op by op (as transformers' Llama-family modules are), autograd keeps every intermediate: RMSNorm keeps
its input, the normalised input and the output; SwiGLU keeps gate, up and silu(gate). Here RMSNorm keeps its
input and one number per token, SwiGLU keeps gate and up, and the backward pass recomputes the rest (a few
elementwise ops). Same maths, same dtypes as transformers' modules; about a quarter less activation memory per
decoder layer. `fuse_layers` swaps them into a model in place; nothing about the weights or saved files changes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class _RMSNorm(torch.autograd.Function):
    """weight * (x / sqrt(mean(x^2) + eps)), normalised in float32 and cast back, as LlamaRMSNorm does."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
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
        return nn.functional.silu(gate) * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        silu = gate * sig
        grad_up = grad * silu
        grad_gate = grad * up * (sig * (1 + gate * (1 - sig)))
        return grad_gate, grad_up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _RMSNorm.apply(x, weight, eps)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _SiluMul.apply(gate, up)


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


def fuse_layers(model: nn.Module) -> tuple[int, int]:
    """Give every Llama-style RMSNorm and SwiGLU MLP in `model` the fused forward. Returns (norms, mlps)."""
    norms = mlps = 0
    for module in model.modules():
        if _is_llama_rms_norm(module):
            module.forward = _norm_forward.__get__(module)
            norms += 1
        elif _is_swiglu_mlp(module):
            module.forward = _mlp_forward.__get__(module)
            mlps += 1
    return norms, mlps
