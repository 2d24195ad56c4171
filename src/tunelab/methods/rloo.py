"""`rloo`: REINFORCE Leave-One-Out (Ahmadian et al., 2024), as TRL's RLOOTrainer computes it.

The prompts, the sampling, the rewards, the samples written and the fast log-probabilities are grpo's
(methods/grpo.py); what differs is how a completion's reward becomes its loss:

    reward_i    = sum of the weighted rewards - beta * sum_t (log p_old(t) - log p_ref(t))
                  (the KL to the reference as a penalty in the reward, first-order and summed over the completion,
                  as the RLOO paper and TRL; p_old: the policy that sampled, scored without dropout)
    advantage_i = reward_i - the mean reward of the other completions of its group (leave-one-out: no
                  completion is its own baseline); normalize_advantages: then to mean 0, std 1 over the batch
    loss        = mean over the micro-batch's completions of -min(ratio_i A_i, clip(ratio_i, 1 - epsilon,
                  1 + epsilon_high) A_i),  ratio_i = p(completion_i) / p_old(completion_i)

The ratio is of whole completions (their log-probabilities summed), not of tokens; with each batch used once it is
1, and the gradient is REINFORCE's, A_i times that of log p(completion_i).
"""

from __future__ import annotations

import torch

from tunelab.methods.base import Method
from tunelab.methods.grpo import GRPOTrainer, build_prompt_rows, nanstd


def leave_one_out(rewards: torch.Tensor, group: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, each group's reward std) for rewards laid out group after group: each reward minus the mean
    of its group's other scored rewards; NaN rewards (no reward scored the completion) are in no baseline and get
    advantage 0, as is a completion alone in its group with a score."""
    grouped = rewards.view(-1, group)
    scored = (~torch.isnan(grouped)).sum(1, keepdim=True)
    baselines = (torch.nansum(grouped, 1, keepdim=True) - grouped) / (scored - 1)
    advantages = (grouped - baselines).view(-1)
    if normalize:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)
    std = nanstd(grouped, dim=1).repeat_interleave(group)
    return torch.nan_to_num(advantages, nan=0.0), std


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


class RLOOTrainer(GRPOTrainer):
    """grpo's rollouts, with the leave-one-out advantage and the per-completion loss."""

    def advantages_of(self, total: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: D102
        if self.beta != 0.0:
            mask = batch["completion_mask"]
            model = self.accelerator.unwrap_model(self.model)
            was_training = model.training
            model.eval()  # the policy that sampled, without dropout's noise in its KL estimate
            try:
                old = self.completion_logps(self.model, batch)
            finally:
                model.train(was_training)
            per_token = (old - batch["ref_logps"]) * mask
            self._record("kl", per_token.sum() / mask.sum().clamp(min=1))
            total = total - self.beta * per_token.sum(1).float().cpu()
        return leave_one_out(total, self.group, self.params.normalize_advantages)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: D102
        mask = inputs["completion_mask"]
        logps = (self.completion_logps(model, inputs) * mask).sum(1)
        loss, metrics = rloo_loss(
            logps,
            logps.detach(),  # each batch is used once: the sampling policy is the policy (ratio 1)
            inputs["advantages"],
            epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high,
        )
        if model.training:
            loss = loss / self.current_gradient_accumulation_steps  # scaled here, as grpo's (loss_is_scaled_for_ga)
            self.trained_tokens += int(mask.sum())
        for name, value in metrics.items():
            self._record(name, value)
        return (loss, {}) if return_outputs else loss


METHOD = Method(model_kind="causal_lm", build_rows=build_prompt_rows, trainer_class=RLOOTrainer)
