"""`grpo`: Group Relative Policy Optimization (Shao et al., 2024), rewards from Python functions.

Each optimizer step: every prompt of the step's batches gets `num_generations` sampled completions (generation
seeded by the step, so a resumed run samples what the uninterrupted one did); the rewards (rewards.py) score
them; a completion's advantage is its total reward minus its group's mean, divided by the group's standard
deviation (`scale_rewards`: group, batch or none). The loss, per completion token t:

    ratio_t = p(t) / p_old(t)                          (p_old: the policy that sampled; 1 in a batch's first
                                                         step; importance_sampling_level sequence (GSPO): one
                                                         ratio per completion, exp of its mean log-ratio)
    loss_t  = -min(ratio_t * A, clip(ratio_t, 1 - epsilon, 1 + epsilon_high) * A) + beta * KL_t
              (delta: ratio_t also capped at delta, INTELLECT-2's two-sided clipping; loss_type cispo:
               -min(ratio_t, epsilon_high), not differentiated, times A * log p(t); loss_type sapo:
               -sigmoid(tau (ratio_t - 1)) * 4 / tau * A, a soft gate, tau sapo_temperature_pos or _neg by A's sign;
               loss_type vespo: -phi(w) * A * log p(t), phi a smooth weight of the completion's whole ratio w)
              times 0 on tokens outside the top_entropy_quantile share by entropy, and on completions the
              off-policy mask drops (negative A, mean KL from p_old above off_policy_mask_threshold)
    KL_t    = p_ref / p - log(p_ref / p) - 1           (k3 estimator; the reference is the base model with the
                                                         LoRA adapter off, or a frozen copy under full training;
                                                         times ratio_t, use_bias_correction_kl, as TRL does)

normalised as TRL's `loss_type` says: `grpo` and `sapo` (mean over each completion's tokens, then over
completions), `bnpo` (mean over the micro-batch's tokens), `dr_grpo` (sum over tokens / (completions x
max_completion_length)), `luspo` (sum over each completion's tokens, mean over completions), `dapo`, `cispo` and
`vespo` (sum over tokens / the tokens of the whole accumulated step; dapo is TRL's default). An entropy bonus
(entropy_coef, or use_adaptive_entropy's controller) subtracts entropy_coef x the trained tokens' mean entropy. The
log-probabilities come from the hidden states at completion positions only (speed/loss.token_logprobs):
full-vocabulary logits never exist.

The sampling, the rewards, num_iterations and steps_per_generation are methods/sampling.py's (SamplingTrainer).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from tunelab.config.llm import LLMParams
from tunelab.methods.base import Method
from tunelab.methods.sampling import SamplingTrainer, build_prompt_rows, clip_range, nanstd

log = logging.getLogger("tunelab")

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
# The losses normalised per token of the whole step (already a share of it: not divided by accumulation).
STEP_TOKEN_LOSSES = ("dapo", "cispo", "vespo")
ENTROPY_STATE_FILE = "entropy_control.json"  # use_adaptive_entropy's coefficient, kept in each checkpoint


# ---- the math ---------------------------------------------------------------------------------------------------


def group_advantages(
    rewards: torch.Tensor, group: int, scale: str, batch_std: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, the std they were divided by) for rewards laid out group after group; NaN rewards (no reward
    scored the completion) are left out of their group's mean and std and get advantage 0. scale "batch" divides
    by `batch_std` (the whole step's, TRL's generation batch), or these rewards' own std."""
    grouped = rewards.view(-1, group)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(group)
    if scale == "batch":
        std = (nanstd(rewards) if batch_std is None else batch_std).expand_as(rewards)
    else:  # "group"; with "none" the std is only reported
        std = nanstd(grouped, dim=1).repeat_interleave(group) if group > 1 else torch.zeros_like(rewards)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0), std


def decoupled_rewards(per_function: torch.Tensor, weights: torch.Tensor, group: int) -> torch.Tensor:
    """multi_objective_aggregation normalize_then_sum (GDPO): each reward (a column of `per_function`, completions
    x rewards, group after group) normalised within its group, then the weighted sum; NaN where no reward scored."""
    grouped = per_function.view(-1, group, per_function.size(1))
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    std = nanstd(grouped, dim=1).unsqueeze(1)
    summed = (((grouped - mean) / (std + 1e-4)).view_as(per_function) * weights).nansum(1)
    summed[torch.isnan(per_function).all(1)] = math.nan
    return summed


def vespo_weights(
    advantages: torch.Tensor,
    log_ratio: torch.Tensor,
    mask: torch.Tensor,
    k: tuple[float, float],
    lam: tuple[float, float],
) -> torch.Tensor:
    """VESPO's weight of each completion, (completions, 1), no gradient: phi(w) = w^k e^(lambda (1 - w)), w the
    completion's whole probability ratio (exp of its summed token log-ratios), k and lambda by the advantage's sign
    (>= 0: the first of each pair). phi(1) = 1; it falls smoothly on both sides, in place of a clip. Computed in
    log space, bounded as TRL bounds it."""
    with torch.no_grad():
        floor = math.log(1e-8)
        log_w = (torch.clamp(log_ratio, -20.0, 20.0) * mask).sum(-1, keepdim=True).clamp(floor, 20.0)
        positive = advantages >= 0
        power = torch.where(positive, *k)
        decay = torch.where(positive, *lam).clamp(min=1e-4)
        return torch.exp(decay + power * log_w - decay * log_w.exp()).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def off_policy_keep(
    advantages: torch.Tensor, logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor, threshold: float
) -> torch.Tensor:
    """DeepSeek-V3.2's off-policy sequence mask, (completions, 1): 0 for a completion with a negative advantage
    whose mean KL from the sampling policy (log p_old - log p per token) is above `threshold`, else 1."""
    kl = ((old_logps - logps.detach()) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (kl <= threshold)).to(mask.dtype)


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str,
    epsilon_low: float,
    epsilon_high: float,
    beta: float,
    max_completion_length: int,
    accumulation: int = 1,
    tokens_in_step: float | None = None,
    kl_bias_correction: bool = True,
    importance_level: str = "token",
    delta: float | None = None,
    sapo_temperatures: tuple[float, float] = (1.0, 1.05),
    vespo: tuple[float, float, float, float] = (2.0, 3.0, 3.0, 2.0),
    off_policy_threshold: float | None = None,
    entropies: torch.Tensor | None = None,
    entropy_mask: torch.Tensor | None = None,
    entropy_coef: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy loss of one micro-batch (completions x tokens), scaled for gradient accumulation as TRL's
    GRPOTrainer scales it, and the figures it logs (kl, clip ratios, entropy).

    `vespo`: (k_pos, lambda_pos, k_neg, lambda_neg). `off_policy_threshold`: the off-policy sequence mask's.
    `entropies`: each token's next-token entropy (logged; with `entropy_coef` not None, a bonus: the mean entropy
    of the trained tokens times it, subtracted from the loss). `entropy_mask`: the tokens the policy loss keeps
    (top_entropy_quantile)."""
    mask = mask.to(logps.dtype)
    advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    token_log_ratio = log_ratio = logps - old_logps
    if importance_level == "sequence":  # GSPO: one ratio per completion, (completions, 1)
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    weight = torch.exp(log_ratio)
    ratio = weight
    phi = None
    if loss_type == "cispo":  # the ratio weighs the log-prob's gradient, capped, never clipped away
        per_token = -torch.clamp(weight, max=epsilon_high).detach() * advantages * logps
    elif loss_type == "sapo":  # a soft gate in place of the clip: sigmoid(tau (ratio - 1)) x 4 / tau, tau by A's sign
        tau = torch.where(advantages > 0, *sapo_temperatures)
        per_token = -torch.sigmoid(tau * (weight - 1)) * 4 / tau * advantages
    elif loss_type == "vespo":  # the whole completion's ratio weighs the log-prob's gradient, smoothly
        phi = vespo_weights(advantages, token_log_ratio, mask, (vespo[0], vespo[2]), (vespo[1], vespo[3]))
        per_token = -phi * advantages * logps
    else:
        clipped = torch.clamp(weight, 1 - epsilon_low, 1 + epsilon_high)
        if delta is not None:  # two-sided: the unclipped branch capped too (where A < 0 it would grow unbounded)
            ratio = torch.clamp(weight, max=delta)
        per_token = -torch.min(ratio * advantages, clipped * advantages)
    if off_policy_threshold is not None:
        per_token = per_token * off_policy_keep(advantages, logps, old_logps, mask, off_policy_threshold)
    if entropy_mask is not None:
        per_token = per_token * entropy_mask
    kl = None
    if beta != 0.0:
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        # DeepSeek-V3.2's correction (TRL's default): times the ratio, whose value is 1 on-policy but whose
        # gradient makes the KL gradient the unbiased reverse-KL one.
        kl = kl * weight if kl_bias_correction else kl  # logged so too, as TRL logs it
        per_token = per_token + beta * kl
    masked = per_token * mask
    if loss_type in ("grpo", "sapo"):
        policy = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        policy = masked.sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        policy = masked.sum() / (per_token.size(0) * max_completion_length)
    elif loss_type == "luspo":  # each completion's loss summed over its tokens (its length weighs it)
        policy = masked.sum(-1).mean()
    elif loss_type in STEP_TOKEN_LOSSES:
        policy = masked.sum() / max(float(tokens_in_step if tokens_in_step is not None else mask.sum()), 1.0)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    loss = policy if loss_type in STEP_TOKEN_LOSSES else policy / accumulation
    if entropies is not None and entropy_coef is not None:
        # the bonus is the mean entropy of the tokens the policy loss trains, whatever the loss type's own
        # normalisation (so entropy_coef means the same for each), scaled only for accumulation (TRL's)
        trained = mask if entropy_mask is None else mask * entropy_mask
        bonus = (entropies * trained).sum() / trained.sum().clamp(min=1.0)
        loss = loss - entropy_coef * bonus / accumulation

    def token_mean(values: torch.Tensor) -> torch.Tensor:
        if values.size(-1) == 1 and mask.size(-1) != 1:  # one value per completion (GSPO): their mean
            return values.mean()
        return (values * mask).sum() / mask.sum().clamp(min=1.0)

    if loss_type == "cispo":
        metrics = {"cispo_clip_ratio": token_mean(((weight > epsilon_high) & (advantages > 0)).to(mask.dtype))}
    elif loss_type == "sapo":
        metrics = {}  # no clipping to count (TRL logs none either)
    elif loss_type == "vespo":
        metrics = {"vespo/phi_seq_mean": phi.mean()}
    else:
        low = (ratio < 1 - epsilon_low) & (advantages < 0)
        high = (ratio > 1 + epsilon_high) & (advantages > 0)
        metrics = {
            "clip_ratio/low_mean": token_mean(low.to(mask.dtype)),
            "clip_ratio/high_mean": token_mean(high.to(mask.dtype)),
            "clip_ratio/region_mean": token_mean((low | high).to(mask.dtype)),
        }
    if kl is not None:
        metrics["kl"] = token_mean(kl.detach())
    if entropies is not None:
        metrics["entropy"] = token_mean(entropies.detach())
        if entropy_coef is not None:
            metrics["policy_loss"] = policy
    return loss, {k: v.detach() for k, v in metrics.items()}


# ---- the trainer ------------------------------------------------------------------------------------------------


class GRPOTrainer(SamplingTrainer):
    """Trains on sampled completions with the GRPO loss: group-relative advantages, clipped ratios, the KL to the
    reference, the entropy mask and bonus."""

    def __init__(self, *args: Any, params: LLMParams, ref_model: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, params=params, ref_model=ref_model, **kwargs)
        self.loss_type = params.loss_type
        self.epsilon_low, self.epsilon_high = clip_range(params)
        # scale_rewards batch and GDPO's aggregation normalise over the whole step: final in finish_advantages
        self.step_wide = params.scale_rewards == "batch" or params.multi_objective_aggregation != "sum_then_normalize"
        # The entropy bonus: entropy_coef, or use_adaptive_entropy's controller, which moves it each step by the
        # step's mean entropy (the last step's decides whether this one's bonus counts: none before a first)
        self.entropy_coef = params.entropy_coef
        self.entropy_bonus = params.entropy_coef != 0.0 or params.use_adaptive_entropy
        self._last_step_entropy = math.inf
        self._step_entropy: torch.Tensor | None = None  # this step's (entropy sum, tokens) so far
        for loss_type, level, why in (
            ("luspo", "sequence", "LUSPO is GSPO's sequence-level ratio with a length-weighted sum"),
            ("vespo", "token", "VESPO forms its own sequence-level weight from the token ratios"),
        ):
            if self.loss_type == loss_type and params.importance_sampling_level != level:
                log.warning("loss_type %s: importance_sampling_level %s is its paper's (%s)", loss_type, level, why)

    def _inner_training_loop(self, *args: Any, **kwargs: Any) -> Any:
        self._step_entropy = None  # (an earlier attempt's, auto_find_batch_size: see SamplingTrainer's)
        return super()._inner_training_loop(*args, **kwargs)

    def finish_advantages(self, batches: list[dict[str, Any]]) -> None:
        """scale_rewards batch, GDPO's aggregation: the advantages normalised over the whole sampling."""
        if self.step_wide:
            values = [batch.pop("step_values") for batch in batches]
            mean, std = self.step_mean_std(torch.cat(values))
            for batch, value in zip(batches, values, strict=True):
                if self.params.multi_objective_aggregation == "normalize_then_sum":
                    advantages = torch.nan_to_num((value - mean) / (std + 1e-4), nan=0.0)
                else:
                    advantages, _ = group_advantages(value, self.group, "batch", batch_std=std)
                batch["advantages"] = advantages.to(batch["advantages"].device)
            self.record("frac_reward_zero_std", torch.isclose(std, torch.zeros_like(std)).float())
        super().finish_advantages(batches)

    def advantages_of(
        self, total: torch.Tensor, batch: dict[str, Any], per_function: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """grpo's advantage: the reward minus its group's mean, scaled (scale_rewards); scale_rewards batch and
        GDPO's aggregation keep the values to finish in finish_advantages."""
        if not self.step_wide:
            return group_advantages(total, self.group, self.params.scale_rewards)
        if self.params.multi_objective_aggregation == "normalize_then_sum":
            weights = torch.tensor([r.weight for r in self.rewards], dtype=per_function.dtype)
            batch["step_values"] = decoupled_rewards(per_function, weights, self.group)
        else:
            batch["step_values"] = total
        return torch.zeros_like(total), None

    def high_entropy_mask(self, entropies: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """top_entropy_quantile: the completion tokens whose entropy is in the top share of this micro-batch's (every
        process's, as TRL gathers them); None when every token is kept."""
        share = self.params.top_entropy_quantile
        if share >= 1.0:
            return None
        local = entropies.detach()[mask.bool()].float()
        # entropies are never negative: a negative pad marks the places other processes had no token
        gathered = self.accelerator.gather(self.accelerator.pad_across_processes(local, dim=0, pad_index=-1e9))
        gathered = gathered[gathered != -1e9]
        if gathered.numel() == 0:
            return torch.zeros_like(mask, dtype=entropies.dtype)
        threshold = torch.quantile(gathered, 1 - share)
        return ((entropies.detach() * mask >= threshold) & mask.bool()).to(entropies.dtype)

    def bonus_coefficient(self) -> float | None:
        """This step's entropy bonus weight (None: no bonus): entropy_coef, which use_adaptive_entropy applies only
        while the last step's mean entropy was at or below entropy_target."""
        if not self.entropy_bonus:
            return None
        if self.params.use_adaptive_entropy and self._last_step_entropy > self.params.entropy_target:
            return 0.0
        return self.entropy_coef

    def control_entropy(self, entropies: torch.Tensor, trained: torch.Tensor) -> None:
        """use_adaptive_entropy: add this micro-batch's entropies up; at the step's last, the step's mean entropy
        (every process's tokens) moves entropy_coef up by entropy_coef_delta if at or below entropy_target, down
        if above, within entropy_coef_min and _max."""
        figures = torch.stack([(entropies.detach() * trained).sum(), trained.sum()]).double()
        self._step_entropy = figures if self._step_entropy is None else self._step_entropy + figures
        if not self.accelerator.sync_gradients:
            return
        total, tokens = self.accelerator.reduce(self._step_entropy, reduction="sum").tolist()
        self._step_entropy = None
        params = self.params
        self._last_step_entropy = total / max(tokens, 1.0)
        if self._last_step_entropy <= params.entropy_target:
            self.entropy_coef = min(self.entropy_coef + params.entropy_coef_delta, params.entropy_coef_max)
        else:
            self.entropy_coef = max(self.entropy_coef - params.entropy_coef_delta, params.entropy_coef_min)

    def save_extras(self, folder: Path) -> None:  # noqa: D102
        super().save_extras(folder)
        if self.params.use_adaptive_entropy:  # the controller's state: a resumed run goes on where it was
            last = self._last_step_entropy
            state = {"entropy_coef": self.entropy_coef, "last_step_entropy": None if math.isinf(last) else last}
            (folder / ENTROPY_STATE_FILE).write_text(json.dumps(state) + "\n")

    def load_extras(self, folder: Path) -> None:  # noqa: D102
        super().load_extras(folder)
        path = folder / ENTROPY_STATE_FILE
        if self.params.use_adaptive_entropy and not path.exists():
            log.warning(
                "%s: %s has no %s (saved without use_adaptive_entropy): entropy_coef starts again from %g",
                self.params.trainer, folder.name, ENTROPY_STATE_FILE, self.entropy_coef,
            )  # fmt: skip
        elif self.params.use_adaptive_entropy:
            state = json.loads(path.read_text())
            self.entropy_coef = float(state["entropy_coef"])
            last = state["last_step_entropy"]
            self._last_step_entropy = math.inf if last is None else float(last)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: D102
        # the entropies are logged, and mask tokens (top_entropy_quantile): only a bonus needs their gradient
        logps, entropies = self.completion_logps(
            model, inputs, entropies="grad" if self.entropy_bonus else True, policy=True
        )
        mask = inputs["completion_mask"]
        entropy_mask = self.high_entropy_mask(entropies, mask)
        params = self.params
        loss, metrics = grpo_loss(
            logps,
            self.old_logps(logps, inputs, model.training),
            inputs.get("ref_logps"),
            inputs["advantages"],
            mask,
            loss_type=self.loss_type,
            epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high,
            beta=self.beta,
            max_completion_length=self.max_length,
            accumulation=self.current_gradient_accumulation_steps if model.training else 1,
            tokens_in_step=num_items_in_batch if model.training else None,
            kl_bias_correction=self.params.use_bias_correction_kl,
            importance_level=self.params.importance_sampling_level,
            delta=params.delta,
            sapo_temperatures=(params.sapo_temperature_pos, params.sapo_temperature_neg),
            vespo=(params.vespo_k_pos, params.vespo_lambda_pos, params.vespo_k_neg, params.vespo_lambda_neg),
            off_policy_threshold=params.off_policy_mask_threshold,
            entropies=entropies,
            entropy_mask=entropy_mask,
            entropy_coef=self.bonus_coefficient(),
        )
        if model.training:
            if params.use_adaptive_entropy:
                trained = mask.to(entropies.dtype) if entropy_mask is None else mask * entropy_mask
                self.control_entropy(entropies, trained)
            if self.entropy_bonus and self.accelerator.sync_gradients:
                self.record("entropy_coef", self.entropy_coef)
        # (grpo_loss divided the policy loss by the accumulation steps itself, per loss_type)
        loss = self.finished_loss(loss, metrics, mask, model.training, scaled=True)
        return (loss, {}) if return_outputs else loss


METHOD = Method(model_kind="causal_lm", build_rows=build_prompt_rows, trainer_class=GRPOTrainer, images=True)
