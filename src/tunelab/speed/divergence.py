"""The distillation loss (methods/distill.py) from hidden states in chunks, as speed/loss.py computes the
cross-entropy: neither model's full-vocabulary logits ever exist.

At each position that carries a loss, the student's and the teacher's next-token distributions, each softened by a
temperature T (s = softmax(z / T), t = softmax(z_t / T)), are compared by TRL's generalized Jensen-Shannon
divergence (GKDTrainer.generalized_jsd_loss, the GKD paper's eq. 1):

    beta = 0:  KL(t || s)                                       forward KL, classic distillation
    beta = 1:  KL(s || t)                                       reverse KL, mode-seeking
    else:      beta KL(t || m) + (1 - beta) KL(s || m),  m = (1 - beta) s + beta t

plus `ce_weight` times the usual cross-entropy on the data's own next token, if asked. A chunk of rows is
projected through both heads, its divergence summed and its gradient with respect to the student's logits written
straight into the hidden states' (and a trained head's) gradient, then the chunk is freed. The gradients with
respect to the student's logits z, with u = z / T:

    forward KL:  (s - t) / T
    reverse KL:  s (a - KL) / T,  a = log s - log t
    mixture:     s (g - sum(s g)) / T,  g = (1 - beta)(log s - log m)
    cross-entropy: softmax(z) - onehot(y)

`divergence_sum_plain` computes the same from full logits with autograd: the path for heads the chunks do not take
(a LoRA head, trained rows of added tokens), and the tests' reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tunelab.speed.loss import chunk_rows


def _weighted(p: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """p log_ratio, 0 where p is 0 (a token the distribution rules out adds nothing, not 0 x -inf)."""
    return torch.where(p > 0, p * log_ratio, 0.0)


def _row_divergence(log_s: torch.Tensor, log_t: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's divergence (N,) and its gradient with respect to the tempered logits u (N, V)."""
    s = log_s.exp()
    if beta == 0:
        t = log_t.exp()
        return _weighted(t, log_t - log_s).sum(-1), s - t
    if beta == 1:
        a = log_s - log_t
        row = (s * a).sum(-1)
        return row, s * (a - row[:, None])
    log_m = torch.logaddexp(log_s + math.log1p(-beta), log_t + math.log(beta))
    row = beta * _weighted(log_t.exp(), log_t - log_m).sum(-1) + (1 - beta) * _weighted(s, log_s - log_m).sum(-1)
    g = (1 - beta) * (log_s - log_m)
    return row, s * (g - _weighted(s, g).sum(-1, keepdim=True))


class ChunkedDistillation(torch.autograd.Function):
    """sum over rows of D_beta(student, teacher at temperature T) + ce_weight x CE(student, target), the student's
    gradients computed in the forward pass, a chunk at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, target, settings):  # noqa: D102
        beta, temperature, ce_weight, chunk, dtype, teacher_dtype = settings
        wants_h, wants_w, wants_b = ctx.needs_input_grad[:3]
        need_grad = wants_h or wants_w or wants_b  # none under no_grad (evaluation): the loss alone
        grad_hidden = torch.empty_like(hidden) if wants_h else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if wants_w else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if wants_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        tw = teacher_weight.to(teacher_dtype)
        tb = None if teacher_bias is None else teacher_bias.to(teacher_dtype)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk].to(dtype)
            z = F.linear(h, w, b).float()
            zt = F.linear(teacher_hidden[start : start + chunk].to(teacher_dtype), tw, tb).float()
            row, grad_u = _row_divergence(
                F.log_softmax(z / temperature, -1), F.log_softmax(zt / temperature, -1), beta
            )
            del zt
            if ce_weight:
                y = target[start : start + chunk]
                lse = torch.logsumexp(z, -1)
                row = row + ce_weight * (lse - z.gather(1, y[:, None]).squeeze(1))
            total += row.sum()
            if not need_grad:
                del z, grad_u
                continue
            grad_z = grad_u.div_(temperature)
            if ce_weight:
                probs = z.sub_(lse[:, None]).exp_()
                probs[torch.arange(len(y), device=y.device), y] -= 1.0
                grad_z.add_(probs, alpha=ce_weight)
                del probs
            del z
            grad_z = grad_z.to(dtype)
            if grad_hidden is not None:
                grad_hidden[start : start + chunk] = grad_z @ w
            if grad_weight is not None:
                grad_weight += (grad_z.T @ h).float()
            if grad_bias is not None:
                grad_bias += grad_z.float().sum(0)
            del grad_z
        grads = (grad_hidden, grad_weight, grad_bias)
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in grads))
        ctx.has = tuple(t is not None for t in grads)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        out = [
            (grad * grad_output).to(dtype) if has else None
            for grad, has, dtype in zip(ctx.saved_tensors, ctx.has, ctx.dtypes, strict=True)
        ]
        return (*out, None, None, None, None, None)


def divergence_sum(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.nn.Module,
    target: torch.Tensor,
    beta: float,
    temperature: float,
    ce_weight: float,
    dtype: torch.dtype,
    teacher_dtype: torch.dtype,
    tokens: int | None = None,
) -> torch.Tensor:
    """The summed loss over the rows of `hidden` (N, H) and `teacher_hidden` (N, H_t), each projected by its head
    in chunks (see the top); `target` (N,) the data's next tokens, read when ce_weight is not 0. `tokens`: how many
    token ids the tokenizer has, the columns compared (a head's rows past them are no tokens)."""
    weight, bias = head.weight, getattr(head, "bias", None)
    if hidden.shape[0] == 0:  # an all-masked batch: a zero that keeps every trained input in the graph (DDP)
        zero = hidden.sum() * 0.0
        return zero + sum((t.sum() * 0.0 for t in (weight, bias) if t is not None), zero)
    # Over the tokenizer's ids: a padded vocabulary's spare rows (Qwen2.5's 151,936 and 152,064 rows for 151,665
    # tokens) are no tokens; the same ids are the same tokens in both (models/checks.check_teacher).
    teacher_weight, teacher_bias = teacher_head.weight, getattr(teacher_head, "bias", None)
    columns = min(weight.shape[0], teacher_weight.shape[0], tokens or weight.shape[0])
    weight, bias = weight[:columns], None if bias is None else bias[:columns]
    teacher_weight, teacher_bias = teacher_weight[:columns], None if teacher_bias is None else teacher_bias[:columns]
    # Each chunk holds about six logit-sized float32 tensors at once (both models' logits, log-probabilities,
    # probabilities, the gradient): half the cross-entropy's rows, so about three of its chunks.
    chunk = max(16, chunk_rows(columns) // 2)
    settings = (beta, temperature, ce_weight, chunk, dtype, teacher_dtype)
    teacher = (teacher_hidden, teacher_weight, teacher_bias)
    return ChunkedDistillation.apply(hidden, weight, bias, *teacher, target, settings)


def divergence_sum_plain(
    logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    beta: float,
    temperature: float,
    ce_weight: float,
    tokens: int | None = None,
) -> torch.Tensor:
    """The same sum from full logits (N, V) and (N, V_t), over the tokenizer's ids, through autograd."""
    columns = min(logits.shape[-1], teacher_logits.shape[-1], tokens or logits.shape[-1])
    logits, teacher_logits = logits[..., :columns], teacher_logits[..., :columns]
    log_s = F.log_softmax(logits.float() / temperature, -1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, -1)
    if beta == 0:
        row = _weighted(log_t.exp(), log_t - log_s).sum(-1)
    elif beta == 1:
        row = _weighted(log_s.exp(), log_s - log_t).sum(-1)
    else:
        log_m = torch.logaddexp(log_s + math.log1p(-beta), log_t + math.log(beta))
        row = beta * _weighted(log_t.exp(), log_t - log_m).sum(-1)
        row = row + (1 - beta) * _weighted(log_s.exp(), log_s - log_m).sum(-1)
    if ce_weight:
        row = row + ce_weight * F.cross_entropy(logits.float(), target, reduction="none")
    return row.sum()
