"""`simpo`: Simple Preference Optimization (Meng et al., 2024): no reference model, length-normalized rewards.

The reward of an answer is beta times its mean log-prob per answer token; the loss asks the chosen answer's reward
to beat the rejected one's by a margin gamma (`simpo_gamma`):

loss = -log sigmoid(beta * (mean log p(chosen) - mean log p(rejected)) - gamma)

with label smoothing as in cDPO, plus `cpo_alpha` times the chosen answers' NLL per token (0: SimPO as published;
1: the CPO-SimPO recipe). This is TRL's CPOTrainer with loss_type="simpo", and it logs the same figures.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from tunelab.methods.base import PER_TOKEN_REWARDS, Method, PairEvaluation
from tunelab.methods.preference import PreferenceTrainer, build_pair_rows, reward_metrics, sequence_sums


def simpo_loss(
    chosen_mean: torch.Tensor,
    rejected_mean: torch.Tensor,
    nll: torch.Tensor,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
    cpo_alpha: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO loss from the mean answer log-probs of each side (and the chosen NLL), with TRL's logged metrics."""
    logits = (chosen_mean - rejected_mean) - gamma / beta
    losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    loss = losses.mean() + cpo_alpha * nll
    chosen_rewards, rejected_rewards = beta * chosen_mean.detach(), beta * rejected_mean.detach()
    metrics = {
        **reward_metrics(chosen_rewards, rejected_rewards, chosen_mean, rejected_mean),
        "nll_loss": nll.detach(),
    }
    return loss, metrics


class SimPOTrainer(PreferenceTrainer):
    def pair_loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        labels = batch["labels"]
        sums, counts = sequence_sums(self.token_logprobs(model, batch, labels, policy=True), labels)
        means = sums / counts.clamp(min=1)
        half = labels.shape[0] // 2
        nll = -sums[:half].sum() / counts[:half].sum().clamp(min=1)
        params = self.params
        return simpo_loss(
            means[:half], means[half:], nll, self.beta, params.simpo_gamma, params.label_smoothing, params.cpo_alpha
        )


def pair_figures(params: Any, rows: list[Any], pairs: Any, policy: Any, reference: Any) -> dict[str, Any]:
    """`tunelab evaluate`'s figures of a simpo run (methods/base.PairEvaluation): the loss function's, every pair."""
    sums, counts = policy
    means = sums / counts.clamp(min=1)
    _, found = simpo_loss(
        means[:, 0], means[:, 1], torch.zeros(()), params.dpo_beta, params.simpo_gamma, params.label_smoothing,
        params.cpo_alpha,
    )  # fmt: skip
    return found


METHOD = Method(
    model_kind="causal_lm",
    build_rows=build_pair_rows,
    trainer_class=SimPOTrainer,
    evaluation=PairEvaluation(pair_figures, "dpo_beta", PER_TOKEN_REWARDS),
    images=True,
)
