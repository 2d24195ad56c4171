"""`dpo`: Direct Preference Optimization (Rafailov et al., 2023) and its variants, as TRL's DPOTrainer has them.

Each pair's log-ratios are r_c = log p(chosen) - log p_ref(chosen) and r_r likewise, log p summed over the answer
tokens, and delta = r_c - r_r. `dpo_loss_type` picks the loss per pair (docs/preference.md has every formula):
sigmoid (the paper's -log sigmoid(beta delta)), hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot,
aot_unpaired, apo_zero, apo_down, discopop, sft, sigmoid_norm. Several, comma-separated, are added with
`dpo_loss_weights` (TRL's multi-loss form); each is a mean over the batch's pairs. Around them:
- f_divergence_type (f-DPO): the log-ratios pass through f' of another divergence before the difference is taken;
- ld_alpha (LD-DPO): the tokens of the longer answer past the shorter one's length count ld_alpha, not 1;
- use_weighting (WPO): each pair's loss is scaled by the policy's per-token-normalised probability of both answers;
- sync_ref_model (TR-DPO): every ref_model_sync_steps steps the reference becomes alpha x the policy + (1 - alpha)
  x itself (full fine-tuning; the reference so moved is kept in each checkpoint, so a resumed run goes on with it).

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
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tunelab.config.llm import LLMParams
from tunelab.data.preference import Pair
from tunelab.data.tokenize import IGNORE
from tunelab.methods.base import REFERENCE_REWARDS, Method, PairEvaluation
from tunelab.methods.preference import (
    PairCollator,
    PreferenceTrainer,
    answer_logprobs,
    build_pair_rows,
    reward_metrics,
    score_answers,
    sequence_sums,
)
from tunelab.models import load_reference
from tunelab.training.reference import load_synced, save_synced, start_syncing
from tunelab.training.trainer import eval_mode

log = logging.getLogger("tunelab")
# exp() of an alpha-divergence score stays finite in the scores' dtype below these (TRL's bounds)
_EXP_LIMIT = {torch.float16: 11.0, torch.bfloat16: 80.0, torch.float32: 80.0}


@dataclass(frozen=True)
class DPOLoss:
    """A dpo run's loss (LLMParams' dpo_loss_type and the settings around it), applied to a batch of pairs'
    summed answer log-probs: the policy's and the reference's, each (pairs,)."""

    beta: float
    types: tuple[str, ...] = ("sigmoid",)
    weights: tuple[float, ...] | None = None
    label_smoothing: float = 0.0
    discopop_tau: float = 0.05
    divergence: str = "reverse_kl"
    alpha: float = 0.5  # f_alpha_divergence_coef

    @classmethod
    def of(cls, params: LLMParams) -> DPOLoss:
        return cls(
            params.dpo_beta,
            params.dpo_loss_types,
            params.dpo_loss_weight_values,
            params.label_smoothing,
            params.discopop_tau,
            params.f_divergence_type,
            params.f_alpha_divergence_coef,
        )

    def __call__(
        self,
        chosen: torch.Tensor,
        rejected: torch.Tensor,
        ref_chosen: torch.Tensor,
        ref_rejected: torch.Tensor,
        counts: tuple[torch.Tensor, torch.Tensor] | None = None,
        pair_weights: torch.Tensor | None = None,
        chosen_nll_sum: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss and the rewards TRL logs. `counts`: answer tokens of each chosen and rejected row (read by ipo,
        sigmoid_norm and sft). `pair_weights`: WPO's, each pair's loss is scaled by. `chosen_nll_sum`: the chosen
        answers' plain log-prob sums, for sft when the sums are LD-DPO's weighted ones (default: `chosen`)."""
        beta = self.beta
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        chosen_rewards, rejected_rewards = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
        chosen_score, rejected_score = self._score(chosen_ratio), self._score(rejected_ratio)
        delta = chosen_score - rejected_score
        smoothing = self.label_smoothing
        loss = chosen.new_zeros(())
        for kind, weight in zip(self.types, self.weights or (1.0,) * len(self.types), strict=True):
            if kind == "sigmoid":
                per_pair = -F.logsigmoid(beta * delta)
            elif kind == "hinge":  # SLiC
                per_pair = torch.relu(1 - beta * delta)
            elif kind == "ipo":  # the scores per answer token, as TRL normalises them
                chosen_n, rejected_n = (c.clamp(min=1) for c in counts)
                per_pair = (chosen_score / chosen_n - rejected_score / rejected_n - 1 / (2 * beta)) ** 2
            elif kind == "exo_pair":  # KL from the model's pair distribution to (1 - eps, eps)
                z = beta * delta
                per_pair = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-smoothing)) + torch.sigmoid(-z) * (
                    F.logsigmoid(-z) - math.log(smoothing)
                )
            elif kind == "nca_pair":
                c, r = beta * chosen_ratio, beta * rejected_ratio
                per_pair = -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)
            elif kind == "robust":  # the sigmoid loss corrected for a label_smoothing share of flipped labels
                clean = -(1 - smoothing) * F.logsigmoid(beta * delta)
                flipped = -smoothing * F.logsigmoid(-beta * delta)
                per_pair = (clean - flipped) / (1 - 2 * smoothing)
            elif kind == "bco_pair":
                per_pair = -F.logsigmoid(beta * chosen_ratio) - F.logsigmoid(-beta * rejected_ratio)
            elif kind == "sppo_hard":  # SPPO with the winner's probability 1, the loser's 0
                per_pair = (chosen_ratio - 0.5 / beta) ** 2 + (rejected_ratio + 0.5 / beta) ** 2
            elif kind in ("aot", "aot_unpaired"):  # the batch's ratios sorted: a distributional margin
                if kind == "aot":
                    gap = (chosen - rejected).sort(dim=0).values - (ref_chosen - ref_rejected).sort(dim=0).values
                else:
                    gap = chosen_ratio.sort(dim=0).values - rejected_ratio.sort(dim=0).values
                per_pair = -(1 - smoothing) * F.logsigmoid(beta * gap) - smoothing * F.logsigmoid(-beta * gap)
            elif kind == "apo_zero":  # chosen answers better than the model's own: chosen up, rejected down
                per_pair = 1 - torch.sigmoid(beta * chosen_ratio) + torch.sigmoid(beta * rejected_ratio)
            elif kind == "apo_down":  # chosen answers worse than the model's own: both down, rejected more
                per_pair = (
                    torch.sigmoid(beta * chosen_ratio) + 1 - torch.sigmoid(beta * (chosen_ratio - rejected_ratio))
                )
            elif kind == "discopop":  # logistic for small margins, exponential for large ones
                z = beta * delta
                mix = torch.sigmoid(z / self.discopop_tau)
                # exp(-z) * mix as one exp: finite where exp(-z) alone overflows and mix is 0
                per_pair = -F.logsigmoid(z) * (1 - mix) + torch.exp(-z + F.logsigmoid(z / self.discopop_tau))
            elif kind == "sft":  # the chosen answers' NLL per token, the same for every pair
                nll_sum = chosen if chosen_nll_sum is None else chosen_nll_sum
                per_pair = (-nll_sum.sum() / counts[0].sum().clamp(min=1)).expand_as(chosen)
            elif kind == "sigmoid_norm":  # the sigmoid loss on the scores per answer token
                chosen_n, rejected_n = (c.clamp(min=1) for c in counts)
                per_pair = -F.logsigmoid(beta * (chosen_score / chosen_n - rejected_score / rejected_n))
            else:
                raise ValueError(f"unknown dpo loss type {kind!r}")
            if pair_weights is not None:
                per_pair = per_pair * pair_weights
            loss = loss + per_pair.mean() * weight
        return loss, reward_metrics(chosen_rewards, rejected_rewards, chosen, rejected)

    def _score(self, ratio: torch.Tensor) -> torch.Tensor:
        """f'(p / p_ref) of the run's f-divergence, from the log-ratio (reverse KL: the log-ratio itself)."""
        if self.divergence == "forward_kl":  # exp kept finite: an inf would make the gradient 0 x inf = NaN
            return 1 - torch.exp((-ratio).clamp(max=_EXP_LIMIT.get(ratio.dtype, 80.0)))
        if self.divergence == "js_divergence":
            return math.log(2) + F.logsigmoid(ratio)
        if self.divergence == "alpha_divergence" and abs(self.alpha - 1) >= 1e-6:  # alpha 1 is reverse KL
            scaled = ((self.alpha - 1) * ratio).float().clamp(max=_EXP_LIMIT.get(ratio.dtype, 80.0))
            return ((torch.exp(scaled) - 1) / (self.alpha - 1)).to(ratio.dtype)
        return ratio


def length_desensitised(
    ld_alpha: float | None,
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(per-token log-probs, labels) of a batch of pairs (chosen rows, then rejected) -> (sums, answer-token counts),
    LD-DPO's way: in each pair, the tokens past the shorter answer's length count ld_alpha (None: 1, plain sums)."""

    def summed(per_token: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sums, counts = sequence_sums(per_token, labels)
        if ld_alpha is None:
            return sums, counts
        scored = labels[:, 1:] != IGNORE
        position = scored.cumsum(-1)  # 1 at an answer's first token
        shared = torch.minimum(*counts.chunk(2)).repeat(2)
        weight = torch.where(position <= shared[:, None], 1.0, ld_alpha) * scored
        return (per_token * weight).sum(-1), counts

    return summed


def wpo_weights(per_token: torch.Tensor, log_sum_sq: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """WPO's weight of each pair: exp of the mean over each answer's tokens of log p(token) - log sum_v p(v)^2
    (the token's probability against the distribution's own peak), chosen times rejected, without gradient."""
    scored = labels[:, 1:] != IGNORE
    aligned = ((per_token.detach() - log_sum_sq) * scored).sum(-1) / scored.sum(-1).clamp(min=1)
    chosen, rejected = torch.exp(aligned).chunk(2)
    return chosen * rejected


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
        start_syncing(self)  # sync_ref_model (TR-DPO)

    def save_extras(self, folder: Path) -> None:  # noqa: D102
        save_synced(self, folder)

    def load_extras(self, folder: Path) -> None:  # noqa: D102
        load_synced(self, folder)

    def reference_logps(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            if self.ref_model is not None:
                return self.token_logprobs(self.ref_model, batch, batch["labels"])
            with self.accelerator.unwrap_model(model).disable_adapter():
                return self.token_logprobs(model, batch, batch["labels"])

    def pair_loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        labels, params = batch["labels"], self.params
        unwrapped = self.accelerator.unwrap_model(model)
        fast = self.fast_loss_now(unwrapped)
        per_token, log_sum_sq = answer_logprobs(
            model, unwrapped, batch, labels, fast, squares=params.use_weighting, balance=self
        )
        summed = length_desensitised(params.ld_alpha)
        policy, counts = summed(per_token, labels)
        if "ref_logps" in batch:  # precompute_ref_log_probs: scored once, before training (with_reference_logps)
            reference = batch["ref_logps"].to(policy.dtype)
        else:
            reference, _ = summed(self.reference_logps(model, batch), labels)
        chosen, rejected = policy.chunk(2)
        ref_chosen, ref_rejected = reference.chunk(2)
        plain_chosen = sequence_sums(per_token, labels)[0].chunk(2)[0] if params.ld_alpha is not None else None
        return DPOLoss.of(params)(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            counts=tuple(counts.chunk(2)),
            pair_weights=wpo_weights(per_token, log_sum_sq, labels) if log_sum_sq is not None else None,
            chosen_nll_sum=plain_chosen,
        )


def pair_figures(params: LLMParams, rows: list[Any], pairs: Any, policy: Any, reference: Any) -> dict[str, Any]:
    """`tunelab evaluate`'s figures of a dpo run (methods/base.PairEvaluation): the loss function's, every pair."""
    (sums, counts), ref = policy, reference[0]
    _, found = DPOLoss.of(params)(sums[:, 0], sums[:, 1], ref[:, 0], ref[:, 1], counts=(counts[:, 0], counts[:, 1]))
    return found


@dataclass
class ScoredPair(Pair):
    """A pair with its two answers' summed log-probs under the reference (precompute_ref_log_probs)."""

    ref_chosen: float = 0.0
    ref_rejected: float = 0.0


def with_reference_logps(
    model: Any,
    train_rows: list[Any],
    valid_rows: list[Any] | None,
    params: LLMParams,
    folder: Path | None,
    images: Any = None,
) -> tuple[list[Any], list[Any] | None]:
    """precompute_ref_log_probs: every pair scored by the reference once, before training, and kept beside the
    prepared data (`folder`, keyed by the reference model's weights), so the trainer needs no reference model
    and a resumed run or the next run on the same data and model scores nothing. `images`: the run's ImageCodec,
    when its pairs show images."""
    if not params.precompute_ref_log_probs:
        return train_rows, valid_rows
    rows = [*train_rows, *(valid_rows or [])]
    store = folder / f"reference-{reference_key(params)}.npy" if folder is not None else None
    scores = np.load(store) if store is not None and store.is_file() else None
    if scores is not None and scores.shape == (len(rows), 2):
        log.info("%s: reference log-probs of %d pairs reused from %s", params.trainer, len(rows), store)
    else:
        started = time.time()
        scores = score_with_reference(model, rows, params, images)
        log.info(
            "%s: reference log-probs of %d pairs scored in %.1f s", params.trainer, len(rows), time.time() - started
        )
        if store is not None:
            with contextlib.suppress(OSError):  # a cache folder that cannot be written: scored again next time
                partial = store.with_name(f".{store.name}.{os.getpid()}.npy")
                np.save(partial, scores)
                os.replace(partial, store)
    scored = [
        ScoredPair(**{f.name: getattr(p, f.name) for f in fields(Pair)}, ref_chosen=float(c), ref_rejected=float(r))
        for p, (c, r) in zip(rows, scores, strict=True)
    ]
    return scored[: len(train_rows)], (scored[len(train_rows) :] if valid_rows else valid_rows)


def score_with_reference(model: Any, rows: list[Pair], params: LLMParams, images: Any = None) -> np.ndarray:
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
    collate = PairCollator(pad_id=0, images=images)  # padding sits after every real token and is masked: any id
    with torch.no_grad(), eval_mode(reference), adapter_off or contextlib.nullcontext():
        with torch.autocast(device.type, dtype=half, enabled=half is not None):
            summed = length_desensitised(params.ld_alpha)
            sums, _ = score_answers(reference, rows, collate, params.batch_size, fast, device, summed)
    scores = sums.numpy().reshape(len(rows), 2)
    if reference is not model:  # model_ref was loaded for the scoring only
        del reference
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return scores


def reference_key(params: LLMParams) -> str:
    """What the reference's scores depend on beyond the prepared data: which weights, in which precision."""
    from tunelab.models.freeze import frozen_in_half
    from tunelab.models.load import resolve_model

    source = resolve_model(params.model_ref or params.model)
    path = Path(source.path) / source.gguf_file if source.gguf_file else Path(source.path)
    files = [path] if path.is_file() else sorted(f for f in path.glob("*") if f.suffix in (".safetensors", ".bin"))
    identity = {
        "model": params.model_ref or params.model,
        "weights": [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files],
        "precision": [params.mixed_precision, params.quantization, params.peft and not params.model_ref],
        # (a freeze run's frozen weights in the half type make another starting model than a full run's fp32 one)
        **({"frozen_half": True} if frozen_in_half(params) and not params.model_ref else {}),
        "fast_loss": params.fast_loss,
        "positions": [params.rope_scaling, params.rope_scaling_factor, params.block_size],  # models/positions.py
    }
    if params.ld_alpha is not None:  # LD-DPO weighs the tokens it sums (absent otherwise: older caches still match)
        identity["ld_alpha"] = params.ld_alpha
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


METHOD = Method(
    model_kind="causal_lm",
    build_rows=build_pair_rows,
    trainer_class=DPOTrainer,
    rows_with_model=with_reference_logps,
    evaluation=PairEvaluation(
        pair_figures, "dpo_beta", REFERENCE_REWARDS, summed=lambda params: length_desensitised(params.ld_alpha)
    ),
    images=True,
)
