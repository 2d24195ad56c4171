"""`rloo`: REINFORCE Leave-One-Out (Ahmadian et al., 2024), as TRL's RLOOTrainer computes it.

The prompts, the sampling, the rewards, the samples written and the fast log-probabilities are those every sampling
method shares (methods/sampling.py); what differs is how a completion's reward becomes its loss:

    reward_i    = sum of the weighted rewards (clipped to reward_clip_range, if given)
                  - beta * sum_t (log p_old(t) - log p_ref(t))
                  (the KL to the reference as a penalty in the reward, first-order and summed over the completion,
                  as the RLOO paper and TRL; the sampling policy and the reference both scored without dropout,
                  where TRL scores them in training mode)
    advantage_i = reward_i - the mean reward of the other completions of its group (leave-one-out: no
                  completion is its own baseline); normalize_advantages: then to mean 0, std 1 over the whole
                  sampling (a step's, or steps_per_generation's steps'; every micro-batch of every process, as
                  TRL's generation batch)
    loss        = mean over the micro-batch's completions of -min(ratio_i A_i, clip(ratio_i, 1 - epsilon,
                  1 + epsilon_high) A_i),  ratio_i = p(completion_i) / p_old(completion_i)

The ratio is of whole completions (their log-probabilities summed), not of tokens; in a batch's first step it is
1, and the gradient is REINFORCE's, A_i times that of log p(completion_i); with num_iterations or
steps_per_generation the later steps on completions of one sampling (sampling.RepeatedBlocks) clip it.
"""

from __future__ import annotations

from typing import Any

import torch

from tunelab.config.llm import LLMParams
from tunelab.methods.base import Method
from tunelab.methods.sampling import SamplingTrainer, build_prompt_rows, clip_range, nanstd
from tunelab.training.trainer import eval_mode


def leave_one_out(rewards: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, each group's reward std) for rewards laid out group after group: each reward minus the mean
    of its group's other scored rewards. NaN rewards (no reward scored the completion) are in no baseline, and
    their advantage is NaN, as is that of a completion alone in its group with a score (zero_unscored: then 0)."""
    grouped = rewards.view(-1, group)
    scored = (~torch.isnan(grouped)).sum(1, keepdim=True)
    baselines = (torch.nansum(grouped, 1, keepdim=True) - grouped) / (scored - 1)
    return (grouped - baselines).view(-1), nanstd(grouped, dim=1).repeat_interleave(group)


def normalised(advantages: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """normalize_advantages: to mean 0 and std 1 by the step's figures (TRL's nan-aware ones)."""
    return (advantages - mean) / (std + 1e-4)


def zero_unscored(advantages: torch.Tensor) -> torch.Tensor:
    """The advantages trained on: an unscorable completion's (NaN) is 0, no learning signal."""
    return torch.nan_to_num(advantages, nan=0.0)


def rloo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped loss of one micro-batch from each completion's summed log-probability (completions,), the mean
    over its completions, and the clip ratios TRL logs."""
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped * advantages).mean()
    low = (ratio < 1 - epsilon_low) & (advantages < 0)
    high = (ratio > 1 + epsilon_high) & (advantages > 0)
    metrics = {
        "clip_ratio/low_mean": low.float().mean(),
        "clip_ratio/high_mean": high.float().mean(),
        "clip_ratio/region_mean": (low | high).float().mean(),
    }
    return loss, {k: v.detach() for k, v in metrics.items()}


class RLOOTrainer(SamplingTrainer):
    """Sampled completions, with the leave-one-out advantage and the per-completion loss."""

    def __init__(self, *args: Any, params: LLMParams, **kwargs: Any) -> None:
        super().__init__(*args, params=params, **kwargs)
        self.epsilon_low, self.epsilon_high = clip_range(params)

    def advantages_of(self, total, batch, per_function=None):  # noqa: D102
        if self.params.reward_clip_values is not None:  # before the penalty, as TRL clips (NaN stays unscored)
            total = total.clamp(*self.params.reward_clip_values)
        if self.beta != 0.0:
            mask = batch["completion_mask"]
            with eval_mode(self.accelerator.unwrap_model(self.model)):  # as the reference pass (below)
                old = self.completion_logps(self.model, batch)
            per_token = (old - batch["ref_logps"]) * mask
            self.record("kl", per_token.sum() / mask.sum().clamp(min=1))
            total = total - self.beta * per_token.sum(1).float().cpu()
        advantages, std = leave_one_out(total, self.group)
        return (advantages if self.params.normalize_advantages else zero_unscored(advantages)), std

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with eval_mode(self.accelerator.unwrap_model(self.model)):  # the KL compares two clean passes
            return super().reference_logps(batch)

    def finish_advantages(self, batches: list[dict[str, Any]]) -> None:
        """normalize_advantages: over the whole step, every micro-batch of every process (TRL's generation batch),
        the unscorable completions (NaN) left out of the mean and std, then 0."""
        if self.params.normalize_advantages:
            mean_std = self.step_mean_std(torch.cat([batch["advantages"].float().cpu() for batch in batches]))
            for batch in batches:
                batch["advantages"] = zero_unscored(normalised(batch["advantages"], *mean_std))
        super().finish_advantages(batches)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: D102
        mask = inputs["completion_mask"]
        per_token = self.completion_logps(model, inputs, policy=True)
        # the sampling policy's log-probs (p itself right after sampling)
        old = self.old_logps(per_token, inputs, model.training)
        logps = (per_token * mask).sum(1)
        loss, metrics = rloo_loss(
            logps,
            (old * mask).sum(1),
            inputs["advantages"],
            epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high,
        )
        loss = self.finished_loss(loss, metrics, mask, model.training)
        return (loss, {}) if return_outputs else loss


METHOD = Method(model_kind="causal_lm", build_rows=build_prompt_rows, trainer_class=RLOOTrainer)
