"""How much accelerator memory a training run needs: an estimate from the model's config, and a measurement.

The dry run (tasks/dry_run.py) calls `run_estimate`: `estimate_memory` with the model's config and the run's
params, beside `available_memory` for the device the run would use, and prints `MemoryEstimate.describe()`; a run
logs the same figure before training (`log_run_estimate`, from tasks/llm.py and tasks/text_classification.py).
`measure_peak` measures the peak of live tensors while a function runs (a real training step, in
bench/measure_memory.py and tests/test_memory.py), which is what the estimate is checked against (docs/memory.md
has the figures).

The estimate follows how tunelab trains (training/trainer.py, speed/loss.py, speed/fused_layers.py,
speed/lora_dropout.py, models/):

- weights: fp32, except the frozen base of a LoRA run under mixed precision (the half type) or int4/int8 QLoRA;
- gradients: fp32 for every trainable parameter (LoRA adapters are fp32 even on a half base);
- optimizer: AdamW keeps two fp32 states per trainable parameter (8-bit AdamW two bytes);
- activations: what autograd saves per decoder layer for the backward pass (all layers without gradient
  checkpointing; each checkpointed layer's input plus one layer recomputed with it), the final norm, and the
  loss, which projects hidden states a chunk at a time (full-vocabulary logits never exist).

Activations and gradients of full fine-tuning peak at different moments with no gradient accumulation (the
gradients are set to None after each optimizer step, and fill up as the activations are freed in the backward
pass); the total takes the larger of the two moments.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config.base import RunParams, listed_tokens

log = logging.getLogger("tunelab")
GiB = 2**30

# Bytes per parameter of each optimizer's state. AdamW keeps exp_avg and exp_avg_sq in fp32; the 8-bit variants
# (bitsandbytes) keep them as one byte each; plain SGD (no momentum in transformers' defaults) keeps nothing;
# Adafactor keeps factored row/column statistics, a few bytes per row, counted as about nothing.
OPTIMIZER_STATE_BYTES = {"8bit": 2, "sgd": 0, "adafactor": 0.1, "lion": 4}


@dataclass
class MemoryEstimate:
    """Peak bytes of live tensors of one training step, by what holds them."""

    weights: int
    gradients: int
    optimizer: int
    activations: int  # saved for backward at the peak, the loss's chunk and the largest transient included
    total: int
    weight_dtype: str = "fp32"
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line, e.g. 'about 3.1 GiB peak: weights 0.5 GiB (fp32), gradients ...'."""
        line = (
            f"about {_gib(self.total)} peak: weights {_gib(self.weights)} ({self.weight_dtype}), "
            f"gradients {_gib(self.gradients)}, optimizer {_gib(self.optimizer)}, "
            f"activations {_gib(self.activations)}"
        )
        return line + (f" ({'; '.join(self.notes)})" if self.notes else "")

    def fits(self, available_bytes: int) -> bool:
        """Whether the estimate fits in `available_bytes` (free memory of the device)."""
        return self.total <= available_bytes


def _gib(n: float) -> str:
    if n < GiB / 10:  # a small model's figures would all read 0.00 GiB
        return f"{n / 2**20:.1f} MiB"
    return f"{n / GiB:.2f} GiB" if n < GiB else f"{n / GiB:.1f} GiB"


@dataclass
class Shape:
    """The sizes of a decoder-only transformer that decide its memory."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    gated_mlp: bool = True  # Llama-style SwiGLU (gate, up, down); GPT-2 style MLPs have two matrices
    rough: bool = False  # sizes guessed from a config that is not Llama-like


def model_shape(config: Any) -> Shape:
    """Read the sizes from a transformers config: Llama-family names first, GPT-2 names next (a vision-language
    model's: its language model's, the head tied as the model says)."""
    outer, config = config, config.get_text_config()
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or getattr(config, "d_model", 0)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None) or 0
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 1
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    llama_like = all(getattr(config, name, None) for name in ("hidden_size", "intermediate_size", "num_hidden_layers"))
    gated = llama_like and getattr(config, "hidden_act", "silu") in ("silu", "swish")
    return Shape(
        hidden=int(hidden),
        intermediate=int(intermediate or 4 * hidden),
        layers=int(layers),
        heads=int(heads),
        kv_heads=int(kv_heads),
        head_dim=int(getattr(config, "head_dim", None) or hidden // heads),
        vocab=int(getattr(config, "vocab_size", 0)),
        tied=bool(getattr(outer, "tie_word_embeddings", getattr(config, "tie_word_embeddings", True))),
        gated_mlp=gated,
        rough=not llama_like or not hidden or not layers,
    )


def kv_cache_bytes(config: Any, sequences: int, length: int, bytes_per_value: int) -> int:
    """The keys and values generation keeps for `sequences` sequences of `length` tokens."""
    shape = model_shape(config)
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * sequences * length * bytes_per_value


def sampling_cache(config: Any, params: Any, length: int) -> tuple[int, int]:
    """grpo, rloo: (the completions one generate call samples, the KV cache they keep at `length` tokens each)."""
    sequences = params.prompts_sampled_at_once * params.completions_per_prompt
    half = getattr(params, "mixed_precision", None) in ("fp16", "bf16")
    return sequences, kv_cache_bytes(config, sequences, length, 2 if half else 4)


def _linears(shape: Shape) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear layer of one decoder layer, by PEFT's module names."""
    h, kv, m = shape.hidden, shape.kv_heads * shape.head_dim, shape.intermediate
    q = shape.heads * shape.head_dim
    mlp = (
        {"gate_proj": (h, m), "up_proj": (h, m), "down_proj": (m, h)}
        if shape.gated_mlp
        else {
            "up_proj": (h, m),
            "down_proj": (m, h),
        }
    )
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), **mlp}


def count_parameters(config: Any) -> int:
    """Parameters of a Llama-like decoder (GPT-2-like configs counted as such, roughly) with its LM head."""
    shape = model_shape(config)
    per_layer = sum(i * o for i, o in _linears(shape).values()) + 2 * shape.hidden  # two norms
    embeddings = shape.vocab * shape.hidden
    head = 0 if shape.tied else embeddings
    return shape.layers * per_layer + embeddings + head + shape.hidden  # + the final norm


def _targeted(shape: Shape, params: RunParams) -> list[tuple[int, int]]:
    """(in, out) features of the linear layers of one decoder layer that get a LoRA adapter."""
    from tunelab.models.peft import target_modules

    targets = target_modules(params.target_modules)
    linears = _linears(shape)
    return list(linears.values()) if targets == "all-linear" else [linears[n] for n in targets if n in linears]


def lora_parameters(config: Any, params: RunParams) -> int:
    """Parameters of a LoRA adapter: r x (in + out) for every targeted linear layer of every decoder layer."""
    shape = model_shape(config)
    return shape.layers * sum(params.lora_r * (i + o) for i, o in _targeted(shape, params))


def _optimizer_bytes_per_param(name: str) -> float:
    name = name.lower()
    for key, size in OPTIMIZER_STATE_BYTES.items():
        if key in name:
            return size
    return 8  # AdamW (torch, fused, paged 32-bit...) and anything unknown: two fp32 states


def estimate_memory(
    config: Any,
    params: RunParams,
    tokens_per_microbatch: int,
    longest_row: int,
    kind: str = "causal_lm",
    device: str | None = None,
) -> MemoryEstimate:
    """Estimate the peak memory of one training step of tunelab.

    Args:
        config: the model's transformers config (hidden_size, intermediate_size, num_hidden_layers, ...).
        params: the run's parameters (peft, lora_r, target_modules, quantization, mixed_precision, optimizer,
            disable_gradient_checkpointing, checkpoint_every, fast_loss, fused_ops, batch_size,
            gradient_accumulation, packing).
        tokens_per_microbatch: tokens of one micro-batch as collated (rows x longest row, padding included).
        longest_row: tokens in the longest row (attention work and masks grow with its square).
        kind: "causal_lm", or "reward"/"classifier" (a score head instead of the LM head: no vocabulary loss).
        device: "cuda" or "cpu", where the run trains (default: a CUDA GPU if there is one); LoRA's dropout
            keeps less on a CPU.

    Returns:
        The estimate of live tensors at the peak, as a GPU's allocator would count them (no allocator slack).
    """
    shape = model_shape(config)
    notes = ["rough: not a Llama-like config"] if shape.rough else []
    n_params = count_parameters(config)
    if kind != "causal_lm" and not shape.tied:
        n_params -= shape.vocab * shape.hidden  # a score head (a few numbers per row) instead of the LM head
    half = params.mixed_precision in ("bf16", "fp16")
    act = 2 if half else 4  # bytes per activation element: autocast runs the matmuls in the half type
    from tunelab.models.checks import freeze_choice
    from tunelab.models.freeze import frozen_in_half

    freezing = freeze_choice(config, params, kind)

    frozen_half = freezing is not None and frozen_in_half(params)  # (as models.load_model loads them)

    # Weights: fp32, but a LoRA run's frozen base is loaded in the half type under mixed precision
    # (models.load_model), or quantized (embeddings stay unquantized, upcast to fp32 by PEFT's k-bit preparation).
    if params.peft and params.quantization in ("int4", "int8"):
        per_weight = 0.5 + 1 / 64 if params.quantization == "int4" else 1.0  # NF4 + its double-quantized scales
        embeddings = shape.vocab * shape.hidden * (1 if shape.tied else 2)
        weights = (n_params - embeddings) * per_weight + embeddings * 4
        weight_dtype = params.quantization
        notes.append("quantized weights: rough")
    elif params.peft and half:
        weights, weight_dtype = n_params * 2, params.mixed_precision
    elif frozen_half:
        weights = (n_params - freezing.trained) * 2 + freezing.trained * 4
        weight_dtype = f"{params.mixed_precision}, trained fp32"
    else:
        weights, weight_dtype = n_params * 4, "fp32"
    from tunelab.models.vision import tower_parameters

    tower = tower_parameters(config)  # a vision-language model's vision tower and projector: frozen, as loaded
    if tower:
        tower_bytes = tower * (2 if (params.peft and half) or frozen_half else 4)
        weights += tower_bytes
        notes.append(f"the vision tower and projector (frozen): {_gib(tower_bytes)}")
    # A frozen copy under full training (or model_ref, loaded unquantized in the run's precision); under LoRA the
    # base with the adapter off, no copy.
    model_ref = getattr(params, "model_ref", None)
    reference = _has_reference(params) and (not params.peft or bool(model_ref))
    if reference and getattr(params, "precompute_ref_log_probs", False):
        notes.append("reference log-probs precomputed: no reference model in memory")
    elif reference:
        weights += (_frozen_parameters(model_ref) * (2 if half else 4)) if model_ref else weights
    if getattr(params, "reward_functions", None):  # grpo's and rloo's reward models, beside the policy
        rewards, unknown = reward_model_bytes(params.reward_functions)
        weights += rewards
        if rewards:
            notes.append(f"the reward models' weights: {_gib(rewards)}")
        notes.extend(f"reward model {name}: its weights not counted (its config does not load)" for name in unknown)
    if getattr(params, "teacher_model", None):  # distill's frozen teacher, in the run's precision
        teacher = _frozen_parameters(params.teacher_model) * (2 if half else 4)
        weights += teacher
        notes.append(f"the teacher's weights: {teacher / 2**30:.2f} GiB")

    if params.peft:
        trainable = lora_parameters(config, params)
        if kind != "causal_lm":
            trainable += shape.hidden * 2  # the new score head is trained too (PEFT's modules_to_save)
        weights += trainable * 4  # the adapter is fp32 even on a half base
    else:
        trainable = freezing.trained if freezing else n_params
    gradients = trainable * 4
    optimizer = int(trainable * _optimizer_bytes_per_param(params.optimizer))

    device = device or _default_device()
    forward, backward = _activations(shape, params, tokens_per_microbatch, longest_row, kind, act, device, freezing)
    if not params.peft and half:
        forward += (trainable if frozen_half else n_params) * 2  # autocast's half copy of each fp32 weight
    # The gradients are set to None after each optimizer step, so with no accumulation they fill up only as the
    # activations are freed in the backward pass: the peak is the larger of those two moments. Accumulating,
    # the next micro-batch's forward pass runs with every gradient alive.
    if params.gradient_accumulation > 1:
        activations = forward
    else:
        activations = max(forward - gradients, backward)
    if params.packing:
        notes.append("packed rows: attention masks counted roughly")
    if kind == "causal_lm" and _method_data(params) in ("pairs", "labeled"):
        notes.append(f"{params.trainer}: its loss counted as the causal LM's, roughly")
    total = weights + gradients + optimizer + activations
    return MemoryEstimate(
        weights=int(weights),
        gradients=int(gradients),
        optimizer=optimizer,
        activations=int(activations),
        total=int(total),
        weight_dtype=weight_dtype,
        notes=notes,
    )


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _activations(
    shape: Shape, params: RunParams, tokens: int, longest: int, kind: str, act: int, device: str, freezing: Any = None
) -> tuple[float, float]:
    """Activation bytes at the two candidate peaks: (the larger of the loss at the end of the forward pass and
    the last layer's backward pass, with no gradient yet; the first layer's backward pass, beyond the gradients).
    `freezing`: a freeze run's models.freeze.Choice (the layers before its first trained one keep nothing)."""
    h, m, kv = shape.hidden, shape.intermediate, shape.kv_heads * shape.head_dim
    q = shape.heads * shape.head_dim
    fused = params.fused_ops and shape.gated_mlp
    # Saved per token by one decoder layer (see fused_layers.py for what the fused norms and SwiGLU keep):
    # layer input, normed input, rotated q and k, v, attention output, its contiguous copy (o_proj's input),
    # the residual sum, the second normed input, gate, up and silu(gate) * up.
    per_token = h + h + q + kv + kv + q + q + h + h + 3 * m
    if not fused:
        per_token += 2 * h + m  # each unfused norm keeps its normalised input too; SwiGLU keeps silu(gate)
    # Under LoRA the fused norms' and SwiGLU's outputs are rebuilt in the backward pass, not kept (fused_layers
    # Rebuild): the two normed inputs and silu(gate) * up are kept by nobody (frozen projections keep none).
    rebuilt = 2 * h + m if fused and params.peft else 0
    per_token -= rebuilt
    per_token_fp32 = 2 * 4 + shape.heads * 4  # two rstd values and the attention's logsumexp per head
    if params.peft:
        # LoRA: each adapted module keeps its rank-r intermediate and a dropout mask: 1 byte an element with
        # fused_ops (lora_dropout.py; on a CPU with p <= 1/8, uncompiled, the int64 positions of the dropped
        # elements instead, 8p bytes an element); PEFT's own dropout keeps the dropped input and a 1-byte mask.
        targeted = _targeted(shape, params)
        ins = sum(i for i, _ in targeted)
        per_token += len(targeted) * params.lora_r
        if params.lora_dropout > 0:
            from tunelab.speed.lora_dropout import POSITIONS_UP_TO

            positions = device == "cpu" and params.lora_dropout <= POSITIONS_UP_TO and not params.torch_compile
            mask = 8 * params.lora_dropout if positions else 1
            per_token += ins * mask / act if fused else ins * (1 + 1 / act)
    layer = tokens * (per_token * act + per_token_fp32)
    # Attention over packed rows gets a block-diagonal mask of longest^2 per row.
    rows = max(1, tokens // max(longest, 1))
    mask = rows * longest * longest if params.packing else 0

    # What each layer keeps until its backward pass: only its input when checkpointed (transformers'
    # every_n_layers checkpoints layers 0, N, 2N...), everything otherwise.
    every = max(1, params.checkpoint_every)
    checkpointed = [not params.disable_gradient_checkpointing and i % every == 0 for i in range(shape.layers)]
    stored = [tokens * h * act if c else layer for c in checkpointed]
    if freezing is not None:  # no layer before the first trained one is in the backward pass: autograd keeps nothing
        stored = [0 if i < freezing.first_layer else size for i, size in enumerate(stored)]
    kept = sum(stored)

    # The end of the model: the final norm keeps its input and output; then the loss.
    head = 2 * tokens * h * act
    # A LoRA run that trains the rows of tokens it added: PEFT rebuilds the embedding weight with those rows in each
    # forward (for the embedding's own forward only), and its gradient comes whole; the chunked loss keeps the
    # head's to the rows (speed/loss.py), while the plain loss keeps the rebuilt head weight for its backward pass.
    # k-bit preparation (QLoRA) keeps the embeddings in float32.
    added = params.peft and bool(listed_tokens(params))
    embedding_bytes = 4 if params.quantization else act
    if added and not params.fast_loss:
        head += shape.vocab * h * embedding_bytes
    if kind == "causal_lm":
        if params.fast_loss:
            # loss.py: the scored hidden states are gathered, their gradient computed in the forward pass, and
            # logits exist a chunk (about CHUNK_BYTES in fp32) at a time; under mixed precision with a half copy
            # beside them (the projection's output, then the half softmax gradient). A full fine-tuning also
            # accumulates the head's fp32 weight gradient there, plus one chunk's product of that size.
            from tunelab.speed.loss import chunk_rows

            chunk = min(tokens, chunk_rows(shape.vocab))
            half_copy = act if act < 4 else 0
            # grpo's entropies: the chunk's probabilities beside its float32 logits (the half copy freed by then)
            per_logit = max(4 + half_copy, 8) if params.trainer == "grpo" else 4 + half_copy
            loss = 2 * tokens * h * act + chunk * shape.vocab * per_logit + chunk * h * 4
            if not params.peft and (freezing is None or freezing.head):
                loss += 2 * shape.vocab * h * 4
        else:
            loss = 3 * tokens * shape.vocab * 4  # logits, their fp32 copy and softmax gradient
            if params.trainer == "grpo" and (params.entropy_coef or params.use_adaptive_entropy):
                loss += 2 * tokens * shape.vocab * 4  # an entropy bonus's log-softmax and probabilities, kept
    else:
        loss = tokens * h * act  # the score head's input: one number per row comes out
    # The backward pass of a decoder layer holds its full activations (recomputed, when checkpointed), the
    # gradient flowing in and out, and the SwiGLU backward's temporaries (sigmoid, silu and the products of
    # fused_layers._SiluMul.backward: about five intermediate-sized tensors beyond gate and up). The layers
    # before it still hold what they stored; the last layer's backward pass, the first, has the most of those.
    rebuilding = m if rebuilt else 0  # down_proj's input, rebuilt for its LoRA gradient
    layer_backward = layer + tokens * ((5 if fused else 3) * m + 2 * h + rebuilding) * act
    if freezing is not None and freezing.first_layer >= shape.layers:
        layer_backward = 0  # only the head (or the final norm) trains: no layer's backward pass runs
    forward = max(kept + head + loss, kept - (stored[-1] if stored else 0) + layer_backward) + mask
    # The end of the backward pass: the gradients are full, the first layer is in its backward pass, and
    # (full fine-tuning) the embedding's gradient is made, then summed into the tied head's (a third copy).
    trains_embeddings = not params.peft and (freezing is None or freezing.embeddings)
    embedding_grads = (2 if shape.tied else 1) * shape.vocab * h * 4 if trains_embeddings else 0
    if added:
        embedding_grads = shape.vocab * h * embedding_bytes
    backward = layer_backward + mask + embedding_grads
    return forward, backward


def run_estimate(
    config: Any, params: RunParams, rows_per_microbatch: int, longest: int, kind: str
) -> tuple[MemoryEstimate, str, int]:
    """(estimate, device, its free bytes) for a run's micro-batch of rows x longest tokens: the figure the dry run
    prints and the run logs before training."""
    memory = estimate_memory(config, params, rows_per_microbatch * longest, longest, kind=kind)
    if getattr(params, "reward_functions", None) and kind == "causal_lm":
        # grpo, rloo: sampling holds the weights, the optimizer's state and a KV cache for every completion of a
        # generate call (the sampling's by default: a step's, or steps_per_generation's), each up to `longest`
        # tokens: its peak may be the run's
        sequences, cache = sampling_cache(config, params, longest)
        sampling = memory.weights + memory.optimizer + cache
        if sampling > memory.total:
            memory.total = sampling
            memory.notes.append(
                f"the peak is sampling's: a KV cache of {_gib(cache)} for {sequences} completions at once "
                "(prompts_per_generation lowers it)"
            )
    device, free = available_memory()
    return memory, device, free


def usable_memory(device: str, free: int) -> int:
    """The part of a device's free memory the estimate (live tensors) may take when choosing checkpointing.

    A GPU's caching allocator adds fragmentation and the CUDA context (about a tenth, and half a GiB, kept aside).
    On a CPU the process's resident memory is up to about twice its live tensors (glibc keeps freed blocks of the
    backward pass's temporaries; bench/memory_breakdown.py measures it), so half the free RAM is counted.
    """
    if device.startswith("cuda"):
        return max(0, int(free * 0.9) - GiB // 2)
    return free // 2


def checkpointing_mode(params: RunParams) -> str:
    """ "auto", "on" or "off": AutoTrain's disable_gradient_checkpointing wins, then gradient_checkpointing (tasks
    without that field checkpoint unless disabled)."""
    if params.disable_gradient_checkpointing:
        return "off"
    return getattr(params, "gradient_checkpointing", "on")


def choose_checkpointing(
    config: Any,
    params: RunParams,
    rows_per_microbatch: int,
    longest: int,
    kind: str,
    available: tuple[str, int] | None = None,
) -> tuple[RunParams, str]:
    """Resolve `gradient_checkpointing: auto` into the fewest checkpointed decoder layers whose estimate fits.

    Tried in order: no checkpointing, then one layer in every N for N from the layer count down to 1 (transformers'
    every_n_layers checkpoints layers 0, N, 2N..., so ceil(layers / N) of them); the first estimate that fits in
    `usable_memory` of `available` (device, free bytes; `available_memory()` when None, read only for auto) is
    taken, every layer when none does. "on" and "off" are
    kept as they are. Returns the params with disable_gradient_checkpointing and checkpoint_every set to the
    choice (gradient_checkpointing "on" or "off"), and one line saying what was chosen and why.
    """
    mode = checkpointing_mode(params)
    layers = model_shape(config).layers
    if mode == "off":
        return _with_checkpointing(params, None), "off (as set)"
    every = max(1, params.checkpoint_every)
    if mode == "on":
        return _with_checkpointing(params, every), f"on, {_layers_phrase(layers, every)} (as set)"
    from tunelab.env import distributed_kind

    if distributed_kind() == "fsdp":
        return _with_checkpointing(params, 1), "under FSDP, FSDP's own activation_checkpointing setting decides"
    device, free = available or available_memory()
    budget = usable_memory(device, free)
    tokens = rows_per_microbatch * longest
    candidates = [None, *sorted({math.ceil(layers / k) for k in range(1, layers + 1)}, reverse=True)]
    estimates = []
    for candidate in candidates:
        chosen = _with_checkpointing(params, candidate)
        estimate = estimate_memory(config, chosen, tokens, longest, kind=kind)
        estimates.append(estimate.total)
        if estimate.fits(budget):
            where = f"{device} has {free / GiB:.1f} GiB free, {_gib(budget)} usable for tensors"
            if candidate is None:
                return chosen, f"off: the run's estimate without it ({_gib(estimate.total)}) fits ({where})"
            return chosen, (
                f"{_layers_phrase(layers, candidate)}: without checkpointing the estimate is {_gib(estimates[0])}, "
                f"more than fits ({where}); with it {_gib(estimate.total)}"
            )
    return _with_checkpointing(params, 1), (
        f"every layer: even so the estimate ({_gib(estimates[-1])}) is more than the {_gib(budget)} usable of "
        f"{device}'s {free / GiB:.1f} GiB free"
    )


def _with_checkpointing(params: RunParams, every: int | None) -> RunParams:
    """params checkpointing every `every`-th layer (None: no checkpointing), as resolved values."""
    changes: dict[str, Any] = {"disable_gradient_checkpointing": every is None}
    if every is not None:
        changes["checkpoint_every"] = every
    if hasattr(params, "gradient_checkpointing"):
        changes["gradient_checkpointing"] = "off" if every is None else "on"
    return dataclasses.replace(params, **changes)


def _layers_phrase(layers: int, every: int) -> str:
    count = math.ceil(layers / every) if layers else 0
    if every == 1:
        return f"every layer ({layers})"
    suffix = "th" if 10 <= every % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(every % 10, "th")
    return f"{count} of {layers} layers (every {every}{suffix})"


def log_run_estimate(config: Any, params: RunParams, rows_per_microbatch: int, longest: int, kind: str) -> None:
    """What a run logs before training: the dry run's figure against the device's free memory, and a warning when
    the estimate is more than that."""
    estimate, device, free = run_estimate(config, params, rows_per_microbatch, longest, kind)
    log.info("memory: %s; %s has %.1f GiB free", estimate.describe(), device, free / 2**30)
    if not estimate.fits(free):
        log.warning(
            "memory: the estimate is more than the free memory of %s: lower batch_size or block_size, or use "
            "--peft / --quantization int4 (--dry-run shows the estimate for a setting)",
            device,
        )


def available_memory(device: str | None = None) -> tuple[str, int]:
    """(the device a run would use, in words; its free bytes): the first CUDA GPU, else this machine's RAM."""
    import torch

    if (device is None or device.startswith("cuda")) and torch.cuda.is_available():
        index = torch.device(device or "cuda:0").index or 0
        free, _ = torch.cuda.mem_get_info(index)
        return f"cuda:{index} {torch.cuda.get_device_name(index)}", int(free)
    return "cpu", _available_ram()


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def measure_peak(fn: Callable[[], Any], model: Any = None) -> int:
    """Peak bytes of live tensors while `fn()` runs.

    On CUDA: torch.cuda.max_memory_allocated (every tensor on the GPU, the model's included). On CPU: the tensors
    that exist before `fn` starts are counted through `model` (its parameters, buffers and gradients, each
    storage once), plus the peak of the storages created while `fn` runs, tracked exactly by `LiveTensors`.
    Tensors made before `fn` by other means (an optimizer built outside it) are not counted.
    """
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())
    baseline = _model_bytes(model) if model is not None else 0
    with LiveTensors() as tracker:
        fn()
    return baseline + tracker.peak


def _model_bytes(model: Any) -> int:
    storages: dict[int, int] = {}
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    for t in tensors:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _tracking_mode() -> type:
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Mode(TorchDispatchMode):
        """Sees every op (forward, backward, optimizer) and the storages of the tensors it returns."""

        def __init__(self, tracker: LiveTensors) -> None:
            super().__init__()
            self.tracker = tracker

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
            import torch

            out = func(*args, **(kwargs or {}))
            inputs = {
                t.untyped_storage().data_ptr()
                for t in tree_flatten((args, kwargs))[0]
                if isinstance(t, torch.Tensor) and t.layout == torch.strided
            }
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.layout == torch.strided and t.device.type != "meta":
                    self.tracker.add(t.untyped_storage(), inputs)
            return out

    return Mode


class LiveTensors:
    """Running total and peak of the tensor storages created inside `with LiveTensors() as t:`.

    Each storage is counted once, when an op first returns it (views and in-place results share their input's
    storage and are skipped), and uncounted when Python's last reference to it dies (weakref.finalize: torch
    keeps one Python object per live storage). This is what a GPU's caching allocator reports as allocated,
    without its rounding; the process's RSS on a CPU is larger (glibc keeps freed blocks).
    """

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        self._lock = threading.RLock()
        self._mode = _tracking_mode()(self)

    def __enter__(self) -> LiveTensors:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)

    def add(self, storage: Any, inputs: set[int]) -> None:
        ptr, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or ptr in inputs:
            return
        with self._lock:
            if ptr in self._sizes:
                return
            self._sizes[ptr] = size
            self.live += size
            self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, ptr)

    def _free(self, ptr: int) -> None:
        with self._lock:
            self.live -= self._sizes.pop(ptr, 0)


def _frozen_parameters(name: str) -> int:
    """How many weights a frozen model beside the trained one has (model_ref, distill's teacher), from its config."""
    from tunelab.models.load import load_config, resolve_model

    return count_parameters(load_config(resolve_model(name)))


def reward_model_bytes(reward_functions: str) -> tuple[int, list[str]]:
    """The weights of the reward models among a run's rewards (folders, hub ids: rewards.ModelReward), as they
    load beside the policy: in their config's dtype, a LoRA reward run's on its base's (its small adapter left
    out), with a score head for the LM head; and the reward models whose config could not be read."""
    from tunelab.models.load import load_config, resolve_model
    from tunelab.rewards import is_reward_model, reward_names

    total, unknown = 0, []
    for name in filter(is_reward_model, reward_names(reward_functions)):
        folder = Path(name).expanduser()
        try:
            config = load_config(resolve_model(_reward_model_base(folder) if folder.is_dir() else _hub_base(name)))
        except Exception:  # (the dry run's reward check names what is wrong with the folder)
            unknown.append(name)
            continue
        shape = model_shape(config)
        count = count_parameters(config) - (0 if shape.tied else shape.vocab * shape.hidden) + shape.hidden
        total += count * _dtype_bytes(config)
    return total, unknown


def _reward_model_base(folder: Path) -> str:
    """What a reward model's weights load from: its folder, or an adapter's base model."""
    from tunelab.outputs import base_model_of

    return base_model_of(folder) if (folder / "adapter_config.json").is_file() else str(folder)


@functools.lru_cache(maxsize=16)  # (asked again for each layout auto checkpointing tries: fetched once)
def _hub_base(name: str) -> str:
    """A hub reward model's _reward_model_base, from the describing files rewards.ModelReward checked (it refuses
    what is no reward model, or an adapter whose base is a local path)."""
    from tunelab.rewards import ModelReward

    return _reward_model_base(ModelReward(name).folder)


def _dtype_bytes(config: Any) -> int:
    """Bytes per weight of a model loaded in its config's own dtype (transformers' dtype="auto"): fp32 if unsaid."""
    dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    return 2 if dtype.removeprefix("torch.") in ("bfloat16", "float16") else 4


def _has_reference(params: RunParams) -> bool:
    """Whether the run's method compares with a reference model (methods.uses_reference says)."""
    from tunelab.methods import uses_reference

    return uses_reference(params)


def _method_data(params: RunParams) -> str | None:
    """What the run's method trains on (its methods.REGISTRY line's data kind), None for a text classifier."""
    from tunelab.methods import REGISTRY

    entry = REGISTRY.get(params.trainer)
    return entry.data if entry else None
