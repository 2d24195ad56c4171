"""Cross-entropy computed from hidden states in chunks, so that full-vocabulary logits never exist.

For a 49k-token vocabulary, the logits of one 1024-token row are 200 MB in fp32, and a plain training step keeps
them (and their softmax) alive for the backward pass. Here only the positions that carry a loss are projected,
a chunk at a time; each chunk's gradient with respect to the hidden states and the output weight is computed
right away (as Liger-Kernel's fused linear cross-entropy does), and the chunk's logits are freed.

The model's own forward is made to return its final hidden states instead of logits
(`output_head_returns_hidden`), so the loss gets them through DDP, FSDP and PEFT wrappers alike;
`fast_loss_supported` says which models allow it.

A LoRA adapter on the output head (`target_modules` naming lm_head) adds a rank-r term to the logits:
W h + B (s A drop(h)). The head's stand-in then returns [h, u] with u = s A drop(h) (rank r, computed inside the
forward, dropout and all), and the chunked loss projects both parts: W h + B u, with B's gradient from u.

A head whose rows for added tokens are trained (PEFT's trainable tokens, models/vocabulary.py) is the same shape:
its weight is the frozen base weight W with k rows replaced by trained ones R. The head's stand-in returns [h, u]
with u = h (R - W[rows]).T (rank k), and the loss projects W h and adds u at the k rows' columns: logits equal to
the head's own, R's gradient from u (the k columns' gradients), and no vocabulary-sized gradient at all (PEFT's
own weight, rebuilt with R in it, would make the loss compute the whole head's).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

# Rows of logits per chunk are chosen so that one fp32 chunk holds about this many bytes. The loss runs at the end
# of the forward pass, when every saved activation is alive, so a chunk adds directly to the peak: keep it small
# (the matmuls of a 64 MiB chunk are still large enough to run at full speed).
CHUNK_BYTES = 64 * 2**20


def chunk_rows(vocab_size: int) -> int:
    return max(16, CHUNK_BYTES // (4 * vocab_size))


def _project(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    low: torch.Tensor | None = None,
    low_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float32 logits of the rows h (+ the low-rank term low @ low_weight.T of a LoRA head, or low added at the
    columns low_weight lists: trained rows of added tokens), all tensors already in the projection dtype."""
    logits = F.linear(h, weight, bias)
    if low is None:
        return logits.float()
    if _columns(low_weight):
        return logits.float().index_add_(1, low_weight, low.float())
    return logits.addmm_(low, low_weight.t()).float()  # added as the adapter's own forward adds it: before the cast


def _columns(low_weight: torch.Tensor | None) -> bool:
    """Whether the low-rank term's weight is the columns it is added at (trained rows of added tokens)."""
    return low_weight is not None and not low_weight.is_floating_point()


def _low_grad(grad_logits: torch.Tensor, low_weight: torch.Tensor) -> torch.Tensor:
    """The gradient of the low-rank term's input u: through its weight, or its columns' gradients."""
    return grad_logits[:, low_weight] if _columns(low_weight) else grad_logits @ low_weight


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if t is None or not t.is_floating_point():
        return t  # column indices stay indices
    return t.to(dtype)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over rows of CE(hidden @ weight.T + bias, target), gradients computed in the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, chunk, dtype, low=None, low_weight=None):  # noqa: D102
        # Autograd turns grad mode off inside forward; needs_input_grad says what the caller needs.
        wants_h, wants_w, wants_b = ctx.needs_input_grad[:3]
        wants_low, wants_low_w = (*ctx.needs_input_grad, False, False)[6:8]  # apply() may stop at dtype
        need_grad = wants_h or wants_w or wants_b or wants_low or wants_low_w
        grad_hidden = torch.empty_like(hidden) if wants_h else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if wants_w else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if wants_b else None
        grad_low = torch.empty_like(low) if wants_low else None
        grad_low_weight = torch.zeros_like(low_weight, dtype=torch.float32) if wants_low_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        w, b, lw = weight.to(dtype), _cast(bias, dtype), _cast(low_weight, dtype)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk].to(dtype)
            u = None if low is None else low[start : start + chunk].to(dtype)
            y = target[start : start + chunk]
            logits = _project(h, w, b, u, lw)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if not need_grad:
                del logits  # before the next chunk is projected: one chunk's logits alive at a time, not two
                continue
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place over the logits
            del logits
            probs[torch.arange(len(y), device=y.device), y] -= 1.0  # d(CE)/d(logits)
            probs = probs.to(dtype)  # a half copy under mixed precision; the float32 one is freed here
            if grad_hidden is not None:
                grad_hidden[start : start + chunk] = probs @ w
            if grad_weight is not None:
                grad_weight += (probs.T @ h).float()
            if grad_bias is not None:
                grad_bias += probs.float().sum(0)
            if grad_low is not None:
                grad_low[start : start + chunk] = _low_grad(probs, lw)
            if grad_low_weight is not None:
                grad_low_weight += (probs.T @ u).float()
            del probs
        grads = (grad_hidden, grad_weight, grad_bias, grad_low, grad_low_weight)
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in grads))
        ctx.has = tuple(t is not None for t in grads)
        ctx.dtypes = tuple(t.dtype if t is not None else None for t in (hidden, weight, bias, low, low_weight))
        return total

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        out = []
        for grad, has, dtype in zip(ctx.saved_tensors, ctx.has, ctx.dtypes, strict=True):
            out.append((grad * grad_output).to(dtype) if has else None)
        grad_hidden, grad_weight, grad_bias, grad_low, grad_low_weight = out
        return grad_hidden, grad_weight, grad_bias, None, None, None, grad_low, grad_low_weight


def linear_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    dtype: torch.dtype | None = None,
    low: torch.Tensor | None = None,
    low_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed next-token cross-entropy of `hidden` (N, H) projected by `weight` (V, H) (plus `low` (N, r) projected
    by `low_weight` (V, r): a LoRA head's term) against `target` (N,), the projection run in `dtype` (default: the
    weight's)."""
    if hidden.shape[0] == 0:
        # An all-masked batch: zero loss, and every input still in the graph, so that each trained parameter gets
        # its (zero) gradient, as DDP expects of every step.
        zero = hidden.sum() * 0.0
        for tensor in (weight, bias, low, low_weight):
            zero = zero if tensor is None else zero + tensor.sum() * 0.0
        return zero
    chunk = chunk_rows(weight.shape[0])
    return ChunkedLinearCrossEntropy.apply(hidden, weight, bias, target, chunk, dtype or weight.dtype, low, low_weight)


def _split(hidden: torch.Tensor, head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
    """The hidden states and, for a LoRA head, its rank-r input u and the B weight that projects it (see the top)."""
    low_weight = getattr(head, "_tunelab_low_weight", None)
    if low_weight is None:
        return hidden, None, None
    width = hidden.shape[-1] - (low_weight.shape[0] if _columns(low_weight) else low_weight.shape[1])
    return hidden[..., :width], hidden[..., width:], low_weight


def causal_lm_loss_sum(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of the loss over every position whose next-token label is not -100, and how many there are."""
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    selected = hidden[:, :-1, :][mask]
    targets = shift_labels[mask]
    selected, low, low_weight = _split(selected, head)
    weight = _projected_by(head)
    bias, dtype = getattr(head, "bias", None), head_dtype(head, weight)
    loss = linear_cross_entropy_sum(selected, weight, bias, targets, dtype, low, low_weight)
    return loss, int(mask.sum())


class ChunkedTokenLogprobs(torch.autograd.Function):
    """log softmax(hidden @ weight.T + bias)[target] per row, chunk by chunk (and, with `entropy`, each row's
    entropy too: a second output, from the same projection).

    For losses that weigh each token's log-probability differently (DPO, ORPO), the gradient cannot be computed
    ahead as above; the backward pass recomputes each chunk's logits instead (one more projection of the scored
    positions), so full logits still never exist.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, chunk, dtype, low=None, low_weight=None, entropy=False):  # noqa: D102
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lses = torch.empty_like(out)
        entropies = torch.empty_like(out) if entropy else None
        w, b, lw = weight.to(dtype), _cast(bias, dtype), _cast(low_weight, dtype)
        for start in range(0, hidden.shape[0], chunk):
            u = None if low is None else low[start : start + chunk].to(dtype)
            logits = _project(hidden[start : start + chunk].to(dtype), w, b, u, lw)
            lse = torch.logsumexp(logits, dim=-1)
            lses[start : start + chunk] = lse
            out[start : start + chunk] = logits.gather(1, target[start : start + chunk, None]).squeeze(1) - lse
            if entropies is not None:  # H = lse - sum_v p(v) z(v); a row-wise dot: no third chunk-sized tensor
                probs = (logits - lse[:, None]).exp_()
                entropies[start : start + chunk] = lse - torch.bmm(probs[:, None, :], logits[:, :, None]).view(-1)
                del probs
            del logits
        optional = (bias, low, low_weight, entropies)
        kept = (t if t is not None else torch.empty(0) for t in optional)
        ctx.save_for_backward(hidden, weight, target, lses, *kept)
        ctx.has = tuple(t is not None for t in optional)
        ctx.chunk, ctx.dtype = chunk, dtype  # backward recomputes in the same dtype
        ctx.set_materialize_grads(False)  # an output nothing used has no gradient: None, not zeros
        if entropies is not None:
            return out, entropies
        return out

    @staticmethod
    def backward(ctx, grad_out, grad_entropy=None):  # noqa: D102
        hidden, weight, target, lses, *optional = ctx.saved_tensors
        bias, low, low_weight, entropies = (t if has else None for t, has in zip(optional, ctx.has, strict=True))
        if grad_out is None:
            grad_out = torch.zeros_like(lses)
        wants_h, wants_w, wants_b = ctx.needs_input_grad[:3]
        wants_low, wants_low_w = (*ctx.needs_input_grad, False, False)[6:8]  # apply() may stop at dtype
        grad_hidden = torch.empty_like(hidden) if wants_h else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if wants_w else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if wants_b else None
        grad_low = torch.empty_like(low) if wants_low else None
        grad_low_weight = torch.zeros_like(low_weight, dtype=torch.float32) if wants_low_w else None
        w, b, lw = weight.to(ctx.dtype), _cast(bias, ctx.dtype), _cast(low_weight, ctx.dtype)
        for start in range(0, hidden.shape[0], ctx.chunk):
            stop = start + ctx.chunk
            h = hidden[start:stop].to(ctx.dtype)
            u = None if low is None else low[start:stop].to(ctx.dtype)
            # d logp[target] / d logits = onehot(target) - p, and d H / d logits = -p (log p + H); each scaled by
            # its row's upstream gradient (g, g_H): -p (g + g_H (log p + H)), plus g at the target.
            log_p = _project(h, w, b, u, lw).sub_(lses[start:stop, None])
            g = grad_out[start:stop, None]
            if grad_entropy is None:
                grad_logits = log_p.exp_().mul_(g).neg_()
            else:
                p = log_p.exp()
                grad_logits = log_p.add_(entropies[start:stop, None]).mul_(grad_entropy[start:stop, None]).add_(g)
                grad_logits.mul_(p).neg_()
                del p
            del log_p  # (the same tensor as grad_logits: freed with it below, before the next chunk is projected)
            grad_logits[torch.arange(len(h), device=h.device), target[start:stop]] += g.squeeze(1)
            grad_logits = grad_logits.to(ctx.dtype)
            if grad_hidden is not None:
                grad_hidden[start:stop] = grad_logits @ w
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ h).float()
            if grad_bias is not None:
                grad_bias += grad_logits.float().sum(0)
            if grad_low is not None:
                grad_low[start:stop] = _low_grad(grad_logits, lw)
            if grad_low_weight is not None:
                grad_low_weight += (grad_logits.T @ u).float()
            del grad_logits  # before the next chunk is projected: one chunk alive at a time
        return (
            grad_hidden,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            grad_bias.to(bias.dtype) if grad_bias is not None else None,
            None,
            None,
            None,
            grad_low,
            grad_low_weight.to(low_weight.dtype) if grad_low_weight is not None else None,
            None,
        )


def token_logprobs(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """Per-position log-probability of the next token for a (batch, length, hidden) tensor: shape
    (batch, length - 1), zero where the next label is -100. Only the scored positions are projected."""
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    out = torch.zeros(shift_labels.shape, dtype=torch.float32, device=hidden.device)
    if mask.any():
        weight, bias = _projected_by(head), getattr(head, "bias", None)
        selected, low, low_weight = _split(hidden[:, :-1, :][mask], head)
        chunk, dtype = chunk_rows(weight.shape[0]), head_dtype(head, weight)
        out[mask] = ChunkedTokenLogprobs.apply(
            selected, weight, bias, shift_labels[mask], chunk, dtype, low, low_weight
        )
    return out


def token_logprobs_and_entropies(
    hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_logprobs`, and the entropy of the next-token distribution at the same positions (zero elsewhere),
    both differentiable, from one projection of the scored positions (grpo's entropy mask and bonus)."""
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    out = torch.zeros(shift_labels.shape, dtype=torch.float32, device=hidden.device)
    entropies = torch.zeros_like(out)
    if mask.any():
        weight, bias = _projected_by(head), getattr(head, "bias", None)
        selected, low, low_weight = _split(hidden[:, :-1, :][mask], head)
        chunk, dtype = chunk_rows(weight.shape[0]), head_dtype(head, weight)
        out[mask], entropies[mask] = ChunkedTokenLogprobs.apply(
            selected, weight, bias, shift_labels[mask], chunk, dtype, low, low_weight, True
        )
    return out, entropies


def token_log_sum_sq_probs(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """log sum_v p(v)^2 at each position `token_logprobs` scores (zero elsewhere), without gradient: how peaked the
    next-token distribution is, which WPO's weights divide each answer token's probability by. A second,
    forward-only projection of the scored positions, chunk by chunk as the log-probs' own."""
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    out = torch.zeros(shift_labels.shape, dtype=torch.float32, device=hidden.device)
    if not mask.any():
        return out
    with torch.no_grad():
        weight, bias = _projected_by(head), getattr(head, "bias", None)
        selected, low, low_weight = _split(hidden[:, :-1, :][mask].detach(), head)
        chunk, dtype = chunk_rows(weight.shape[0]), head_dtype(head, weight)
        w, b, lw = weight.to(dtype), _cast(bias, dtype), _cast(low_weight, dtype)
        values = []
        for start in range(0, selected.shape[0], chunk):
            u = None if low is None else low[start : start + chunk].to(dtype)
            logits = _project(selected[start : start + chunk].to(dtype), w, b, u, lw)
            values.append(torch.logsumexp(2 * logits, dim=-1) - 2 * torch.logsumexp(logits, dim=-1))
            del logits
        out[mask] = torch.cat(values)
    return out


def logits_log_sum_sq_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The plain path's `token_log_sum_sq_probs`: from full logits, the same shape and zeros, no gradient; only the
    scored positions, a chunk of them at a time in float32 (no second vocabulary-wide copy of the logits)."""
    mask = labels[:, 1:] != -100
    out = torch.zeros(mask.shape, dtype=torch.float32, device=logits.device)
    with torch.no_grad():
        selected = logits[:, :-1][mask]
        chunk = chunk_rows(logits.shape[-1])
        values = [
            torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1)
            for z in (selected[start : start + chunk].float() for start in range(0, selected.shape[0], chunk))
        ]
        if values:
            out[mask] = torch.cat(values)
    return out


def logits_entropies(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The plain path's entropies of `token_logprobs_and_entropies`: from full logits, at the scored positions only
    (zero elsewhere); differentiable where grad is on, else a chunk of positions at a time (no vocabulary-wide
    copies of all of them)."""
    mask = labels[:, 1:] != -100
    out = torch.zeros(mask.shape, dtype=torch.float32, device=logits.device)
    selected = logits[:, :-1][mask]
    if not selected.numel():
        return out
    if torch.is_grad_enabled() and selected.requires_grad:
        log_p = torch.log_softmax(selected.float(), -1)
        out[mask] = -(log_p.exp() * log_p).sum(-1)
        return out
    chunk, values = chunk_rows(logits.shape[-1]), []
    for start in range(0, selected.shape[0], chunk):
        log_p = torch.log_softmax(selected[start : start + chunk].float(), -1)
        values.append(-(log_p.exp() * log_p).sum(-1))
    out[mask] = torch.cat(values)
    return out


def logits_token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The plain path's `token_logprobs`: from full logits (batch, length, vocab), the same shape and zeros."""
    targets = labels[:, 1:]
    picked = torch.log_softmax(logits[:, :-1].float(), -1).gather(2, targets.clamp(min=0)[..., None]).squeeze(2)
    return picked * (targets != -100)


def fast_loss_supported(model: Any) -> bool:
    """The hidden-state loss needs logits == lm_head(hidden); models that rescale or cap logits use the plain path."""
    config = getattr(model, "config", None)
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling"):
        if getattr(config, name, None) not in (None, 1, 1.0):
            return False
    head = model.get_output_embeddings()
    return head is not None and _lora_head_splits(head) and not head_sharded_outside_forward(model)


def head_sharded_outside_forward(model: Any) -> bool:
    """DeepSpeed ZeRO-3 gathers a module's weights only around its own forward, and the chunked loss reads the output
    head's after it (FSDP2 keeps the root module's, the head's among them, gathered until the backward pass)."""
    head = model.get_output_embeddings()
    return head is not None and any(hasattr(param, "ds_id") for param in head.parameters())


def _lora_head_splits(head: torch.nn.Module) -> bool:
    """Whether the loss can add a LoRA head's term itself: true for a head without adapters and for plain LoRA
    adapters (B without bias); false for LoRA variants (DoRA) and other adapter kinds, which keep the plain path."""
    lora_a = getattr(head, "lora_A", None)
    if lora_a is None:
        return not hasattr(head, "base_layer")  # another PEFT tuner's layer (IA3, LoHa, ...)
    from peft.tuners.lora.layer import Linear as LoraLinear

    return type(head) is LoraLinear and all(
        name not in head.lora_variant and type(head.lora_B[name]) is torch.nn.Linear and head.lora_B[name].bias is None
        for name in lora_a
    )


def _token_rows_term(head: torch.nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For a head with trained rows of added tokens (see the top): u = hidden @ (R - W[rows]).T and the rows'
    columns (a long tensor); None with the adapter off, merged, or several adapters active (then the loss projects
    with the head's own weight, as rebuilt by PEFT)."""
    adapter = head.token_adapter
    names = [name for name in adapter.active_adapters if name in adapter.trainable_tokens_delta]
    if adapter.disable_adapters or adapter.merged or len(names) != 1:
        return None
    rows, indices = adapter.trainable_tokens_delta[names[0]], adapter.token_indices[names[0]]
    base = adapter.get_base_layer().weight
    columns = torch.as_tensor(list(indices), dtype=torch.long, device=base.device)
    change = rows - base[columns].to(rows.dtype)
    x = hidden if torch.is_autocast_enabled(hidden.device.type) else hidden.to(change.dtype)
    head.__dict__["_tunelab_base_weight"] = base
    return F.linear(x, change), columns


def _lora_head_term(head: torch.nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For a LoRA head with active adapters: u = scaling * lora_A(dropout(hidden)) per adapter, and the B weights
    that project them (side by side where several adapters are active); None when no adapter adds anything."""
    head.__dict__["_tunelab_base_weight"] = None
    if hasattr(head, "token_adapter"):
        return _token_rows_term(head, hidden)
    if not hasattr(head, "lora_A") or head.disable_adapters or head.merged:
        return None  # merged: the base weight already holds the update
    names = [name for name in head.active_adapters if name in head.lora_A]
    if not names:
        return None
    from tunelab.speed.lora_dropout import DropoutLoraA

    lows = []
    for name in names:
        lora_a, scaling = head.lora_A[name], head.scaling[name]
        if isinstance(lora_a, DropoutLoraA):  # fused_ops: the dropout is folded in, and the cast
            lows.append(lora_a(hidden, scaling))
        else:
            x = hidden if torch.is_autocast_enabled(hidden.device.type) else hidden.to(lora_a.weight.dtype)
            lows.append(lora_a(head.lora_dropout[name](x)) * scaling)
    weights = [head.lora_B[name].weight for name in names]
    if len(names) == 1:
        return lows[0], weights[0]
    return torch.cat(lows, -1), torch.cat(weights, 1)


@contextlib.contextmanager
def output_head_returns_hidden(model: Any) -> Iterator[torch.nn.Module]:
    """Make the output head an identity for one forward pass, yielding the real head.

    The model's own forward (through DDP, FSDP or PEFT wrappers) then returns its final hidden states as
    `logits`, at no cost, and the loss projects them chunk by chunk, in the dtype the head would have run in
    inside that forward (`head_dtype`).
    """
    head = model.get_output_embeddings()

    def identity(hidden: torch.Tensor) -> torch.Tensor:
        # Under mixed precision the forward runs under autocast, and the head's matmul with it; accelerate then
        # hands the outputs back in float32. Recorded here so that the loss projects as the head would have.
        device = hidden.device.type
        head._tunelab_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        # A LoRA head: its rank-r input rides along with the hidden states (see the top); per forward, as a
        # reference pass may run with the adapter off.
        term = _lora_head_term(head, hidden)
        # Into __dict__: assigned as an attribute, the Parameter B would be registered as one of the head's own.
        head.__dict__["_tunelab_low_weight"] = None if term is None else term[1]
        if term is None:
            return hidden
        return torch.cat([hidden, term[0].to(hidden.dtype)], -1)

    previous = head.__dict__.get("forward")  # a forward of its own (fused_ops' LoRA forward) comes back after
    head.forward = identity
    try:
        yield head
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous


def _projected_by(head: torch.nn.Module) -> torch.Tensor:
    """The weight the chunked loss projects the hidden states with: the head's, or the frozen base weight beside a
    term for trained rows of added tokens (see the top)."""
    base = head.__dict__.get("_tunelab_base_weight")
    return head.weight if base is None else base


def head_dtype(head: torch.nn.Module, weight: torch.Tensor | None = None) -> torch.dtype:
    """The dtype the output head's matmuls run in: autocast's, when the last forward through
    `output_head_returns_hidden` ran under it, else the head weight's. Half-precision weights (LoRA under bf16
    or fp16) meet hidden states that accelerate up-cast to float32 after the forward; they were half before, so
    casting them back loses nothing."""
    return getattr(head, "_tunelab_dtype", None) or (head.weight if weight is None else weight).dtype
