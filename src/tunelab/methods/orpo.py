"""`orpo`: Odds Ratio Preference Optimization (Hong et al., 2024): no reference model.

loss = NLL(chosen) - beta * mean(log sigmoid(log odds(chosen) - log odds(rejected))),
odds(y) = p / (1 - p) with log p the mean log-prob per answer token (as in the paper and TRL).

The NLL term is the mean over the chosen answer tokens; with completion_only_loss off it also covers the prompt
tokens, which is what TRL's ORPOTrainer does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from tunelab.data.tokenize import IGNORE
from tunelab.methods.base import PER_TOKEN_REWARDS, Method, PairEvaluation
from tunelab.methods.preference import PreferenceTrainer, build_pair_rows, reward_metrics, sequence_sums


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, computed stably on both sides of -log 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, nll: torch.Tensor, beta: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO loss from the mean answer log-probs of each side and the chosen NLL, and TRL's logged metrics."""
    chosen_mean, rejected_mean = chosen_mean.float(), rejected_mean.float()
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    ratio = F.logsigmoid(log_odds)
    loss = nll - beta * ratio.mean()
    chosen_rewards, rejected_rewards = beta * chosen_mean.detach(), beta * rejected_mean.detach()
    metrics = {
        **reward_metrics(chosen_rewards, rejected_rewards, chosen_mean, rejected_mean),
        "nll_loss": nll.detach(),
        "log_odds_ratio": ratio.detach().mean(),
        "log_odds_chosen": log_odds.detach().mean(),
    }
    return loss, metrics


class ORPOTrainer(PreferenceTrainer):
    def pair_loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        labels = batch["labels"]
        half = labels.shape[0] // 2
        scored = labels
        if not self.params.completion_only_loss:  # the chosen rows' prompt tokens count in the NLL too
            scored = labels.clone()
            chosen_ids = batch["input_ids"][:half]
            scored[:half] = chosen_ids.masked_fill(batch["attention_mask"][:half] == 0, IGNORE)
            if "image_tokens" in batch:  # an image's tokens are the image, never a target (as in sft)
                scored[:half] = scored[:half].masked_fill(batch["image_tokens"][:half], IGNORE)
        per_token = self.token_logprobs(model, batch, scored, policy=True)
        sums, counts = sequence_sums(per_token, labels)
        means = sums / counts.clamp(min=1)
        nll_sums, nll_counts = sequence_sums(per_token[:half], scored[:half])
        nll = -nll_sums.sum() / nll_counts.sum().clamp(min=1)
        chosen, rejected = means[:half], means[half:]
        return orpo_loss(chosen, rejected, nll, self.beta)


def pair_figures(params: Any, rows: list[Any], pairs: Any, policy: Any, reference: Any) -> dict[str, Any]:
    """`tunelab evaluate`'s figures of an orpo run (methods/base.PairEvaluation): the loss function's, every pair
    (the NLL left out: it depends on completion_only_loss, not on the pairs alone)."""
    sums, counts = policy
    means = sums / counts.clamp(min=1)
    _, found = orpo_loss(means[:, 0], means[:, 1], torch.zeros(()), params.dpo_beta)
    return found


METHOD = Method(
    model_kind="causal_lm",
    build_rows=build_pair_rows,
    trainer_class=ORPOTrainer,
    evaluation=PairEvaluation(pair_figures, "dpo_beta", PER_TOKEN_REWARDS),
    images=True,
)
