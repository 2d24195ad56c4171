"""`dpo`: Direct Preference Optimization (Rafailov et al., 2023) and its loss variants, as TRL's DPOTrainer has them.

With delta = (log p(chosen) - log p_ref(chosen)) - (log p(rejected) - log p_ref(rejected)), log p summed over the
answer tokens, `dpo_loss_type` picks the loss per pair:
- sigmoid (the paper): -log sigmoid(beta * delta)
- hinge (SLiC): max(0, 1 - beta * delta)
- ipo (Azar et al.): (delta' - 1 / (2 beta))^2, delta' from log-probs averaged per answer token (as TRL does)
- robust (Chowdhury et al.): the sigmoid loss corrected for a label_smoothing share of flipped preferences
- sft: the chosen answers' NLL per token (to add to another, as in MPO or RPO)
Several, comma-separated, are added with `dpo_loss_weights` (TRL's multi-loss form); each is a mean over pairs.

The reference model is `model_ref` when given; else, for a LoRA run, the
base model itself with the adapter switched off (no second copy in memory); else a frozen copy of the starting
model. The logged rewards are beta * (log p - log p_ref), as in TRL, so the two can be compared.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tunelab.config.llm import LLMParams
from tunelab.data.preference import Pair
from tunelab.methods.base import REFERENCE_REWARDS, Method, PairEvaluation
from tunelab.methods.preference import (
    PairCollator,
    PreferenceTrainer,
    build_pair_rows,
    reward_metrics,
    score_answers,
    sequence_sums,
)
from tunelab.models import load_reference
from tunelab.training.trainer import eval_mode

log = logging.getLogger("tunelab")


def dpo_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_types: tuple[str, ...] = ("sigmoid",),
    weights: tuple[float, ...] | None = None,
    label_smoothing: float = 0.0,
    counts: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DPO loss (one of methods.DPO_LOSS_TYPES, or a weighted sum) over summed answer log-probs, and the rewards
    TRL logs. `counts` (answer tokens of each chosen and rejected row) are needed by ipo and sft."""
    chosen_rewards = beta * (chosen - ref_chosen).detach()
    rejected_rewards = beta * (rejected - ref_rejected).detach()
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    loss = chosen.new_zeros(())
    for kind, weight in zip(loss_types, weights or (1.0,) * len(loss_types), strict=True):
        if kind == "sigmoid":
            per_pair = -F.logsigmoid(beta * delta)
        elif kind == "hinge":
            per_pair = torch.relu(1 - beta * delta)
        elif kind == "ipo":
            chosen_n, rejected_n = (c.clamp(min=1) for c in counts)
            per_pair = (chosen_ratio / chosen_n - rejected_ratio / rejected_n - 1 / (2 * beta)) ** 2
        elif kind == "robust":
            clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
            flipped = -label_smoothing * F.logsigmoid(-beta * delta)
            per_pair = (clean - flipped) / (1 - 2 * label_smoothing)
        elif kind == "sft":
            per_pair = -chosen.sum() / counts[0].sum().clamp(min=1)
        else:
            raise ValueError(f"unknown dpo loss type {kind!r}")
        loss = loss + per_pair.mean() * weight
    return loss, reward_metrics(chosen_rewards, rejected_rewards, chosen, rejected)


class DPOTrainer(PreferenceTrainer):
    def __init__(self, *args: Any, ref_model: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        unwrapped = self.accelerator.unwrap_model(self.model)
        self.ref_model = None
        if getattr(self.params, "precompute_ref_log_probs", False) and ref_model is None:
            log.info(
                "%s: the reference's log-probs were scored before training; no reference model in memory",
                self.params.trainer,
            )
            return
        if ref_model is None and self.params.model_ref:
            ref_model = load_reference(self.params, like=unwrapped)
        if ref_model is None and not hasattr(unwrapped, "disable_adapter"):
            log.info("%s: reference model = a frozen copy of the starting model", self.params.trainer)
            ref_model = copy.deepcopy(unwrapped)
        if ref_model is not None:
            ref_model.requires_grad_(False).eval()
            ref_model.to(self.args.device)
        elif self.params.peft:
            log.info("%s: reference model = the base model with the LoRA adapter switched off", self.params.trainer)
        self.ref_model = ref_model

    def reference_logps(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            if self.ref_model is not None:
                return self.token_logprobs(self.ref_model, batch, batch["labels"])
            with self.accelerator.unwrap_model(model).disable_adapter():
                return self.token_logprobs(model, batch, batch["labels"])

    def pair_loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        labels = batch["labels"]
        policy, counts = sequence_sums(self.token_logprobs(model, batch, labels), labels)
        if "ref_logps" in batch:  # precompute_ref_log_probs: scored once, before training (with_reference_logps)
            reference = batch["ref_logps"].to(policy.dtype)
        else:
            reference, _ = sequence_sums(self.reference_logps(model, batch), labels)
        chosen, rejected = policy.chunk(2)
        ref_chosen, ref_rejected = reference.chunk(2)
        params = self.params
        return dpo_loss(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            self.beta,
            loss_types=params.dpo_loss_types,
            weights=params.dpo_loss_weight_values,
            label_smoothing=params.label_smoothing,
            counts=tuple(counts.chunk(2)),
        )


def pair_figures(params: LLMParams, rows: list[Any], pairs: Any, policy: Any, reference: Any) -> dict[str, Any]:
    """`tunelab evaluate`'s figures of a dpo run (methods/base.PairEvaluation): the loss function's, every pair."""
    (sums, counts), ref = policy, reference[0]
    _, found = dpo_loss(
        sums[:, 0], sums[:, 1], ref[:, 0], ref[:, 1], params.dpo_beta, params.dpo_loss_types,
        params.dpo_loss_weight_values, params.label_smoothing, counts=(counts[:, 0], counts[:, 1]),
    )  # fmt: skip
    return found


@dataclass
class ScoredPair(Pair):
    """A pair with its two answers' summed log-probs under the reference (precompute_ref_log_probs)."""

    ref_chosen: float = 0.0
    ref_rejected: float = 0.0


def with_reference_logps(
    model: Any, train_rows: list[Any], valid_rows: list[Any] | None, params: LLMParams, folder: Path | None
) -> tuple[list[Any], list[Any] | None]:
    """precompute_ref_log_probs: every pair scored by the reference once, before training, and kept beside the
    prepared data (`folder`, keyed by the reference model's weights), so the trainer needs no reference model
    and a resumed run or the next run on the same data and model scores nothing."""
    if not params.precompute_ref_log_probs:
        return train_rows, valid_rows
    rows = [*train_rows, *(valid_rows or [])]
    store = folder / f"reference-{reference_key(params)}.npy" if folder is not None else None
    scores = np.load(store) if store is not None and store.is_file() else None
    if scores is not None and scores.shape == (len(rows), 2):
        log.info("%s: reference log-probs of %d pairs reused from %s", params.trainer, len(rows), store)
    else:
        started = time.time()
        scores = score_with_reference(model, rows, params)
        log.info(
            "%s: reference log-probs of %d pairs scored in %.1f s", params.trainer, len(rows), time.time() - started
        )
        if store is not None:
            with contextlib.suppress(OSError):  # a cache folder that cannot be written: scored again next time
                partial = store.with_name(f".{store.name}.{os.getpid()}.npy")
                np.save(partial, scores)
                os.replace(partial, store)
    scored = [
        ScoredPair(p.prompt_ids, p.chosen_ids, p.rejected_ids, float(c), float(r))
        for p, (c, r) in zip(rows, scores, strict=True)
    ]
    return scored[: len(train_rows)], (scored[len(train_rows) :] if valid_rows else valid_rows)


def score_with_reference(model: Any, rows: list[Pair], params: LLMParams) -> np.ndarray:
    """(chosen, rejected) summed answer log-probs of every pair under the reference: `model_ref`, else the model
    about to be trained as it starts (with LoRA: its adapter switched off), under the run's mixed precision."""
    from accelerate import PartialState

    from tunelab.speed.loss import fast_loss_supported

    reference = load_reference(params, like=model) if params.model_ref else model
    device = PartialState().device
    if not getattr(reference, "is_quantized", False):
        reference.to(device)
    fast = params.fast_loss and fast_loss_supported(reference)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(params.mixed_precision or "")
    adapter_off = reference.disable_adapter() if reference is model and hasattr(model, "disable_adapter") else None
    collate = PairCollator(pad_id=0)  # padding sits after every real token and is masked: any id does
    with torch.no_grad(), eval_mode(reference), adapter_off or contextlib.nullcontext():
        with torch.autocast(device.type, dtype=half, enabled=half is not None):
            sums, _ = score_answers(reference, rows, collate, params.batch_size, fast, device)
    scores = sums.numpy().reshape(len(rows), 2)
    if reference is not model:  # model_ref was loaded for the scoring only
        del reference
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return scores


def reference_key(params: LLMParams) -> str:
    """What the reference's scores depend on beyond the prepared data: which weights, in which precision."""
    from tunelab.models.load import resolve_model

    source = resolve_model(params.model_ref or params.model)
    path = Path(source.path) / source.gguf_file if source.gguf_file else Path(source.path)
    files = [path] if path.is_file() else sorted(f for f in path.glob("*") if f.suffix in (".safetensors", ".bin"))
    identity = {
        "model": params.model_ref or params.model,
        "weights": [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files],
        "precision": [params.mixed_precision, params.quantization, params.peft and not params.model_ref],
        "fast_loss": params.fast_loss,
        "positions": [params.rope_scaling, params.rope_scaling_factor, params.block_size],  # models/positions.py
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


METHOD = Method(
    model_kind="causal_lm",
    build_rows=build_pair_rows,
    trainer_class=DPOTrainer,
    rows_with_model=with_reference_logps,
    evaluation=PairEvaluation(pair_figures, "dpo_beta", REFERENCE_REWARDS),
)
