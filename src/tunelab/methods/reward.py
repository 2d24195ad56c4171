"""`reward`: a reward model, a sequence classifier with one output trained so chosen outscores rejected.

loss = -log sigmoid(r(prompt + chosen) - r(prompt + rejected) - margin)  (Bradley-Terry)
       + center_rewards_coefficient * mean((r(prompt + chosen) + r(prompt + rejected))^2)

margin is each pair's from margin_column (Llama 2's reward models), else 0; the second term (TRL's, off unless
center_rewards_coefficient is given) keeps the rewards centred on 0.

The score is read at each row's last token (transformers' sequence-classification heads do this, so the saved
model scores the same way in `AutoModelForSequenceClassification` and `tunelab score`). Logged: pairwise
accuracy (how often chosen outscores rejected), the mean margin and the mean reward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from tunelab.methods.base import Method
from tunelab.methods.preference import PreferenceTrainer, build_pair_rows


def reward_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coefficient: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    chosen, rejected = chosen.float(), rejected.float()
    gap = chosen - rejected if margin is None else chosen - rejected - margin.to(chosen.device)
    loss = -F.logsigmoid(gap).mean()
    if center_coefficient is not None:
        loss = loss + center_coefficient * ((chosen + rejected) ** 2).mean()
    metrics = {
        "accuracy": (chosen > rejected).float().mean(),
        "margin": (chosen - rejected).detach().mean(),
        "mean_reward": torch.cat([chosen, rejected]).detach().mean(),
    }
    return loss, metrics


class RewardTrainer(PreferenceTrainer):
    def pair_loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        chosen, rejected = scores.logits.squeeze(-1).chunk(2)
        return reward_loss(chosen, rejected, batch.get("margin"), self.params.center_rewards_coefficient)


METHOD = Method(
    model_kind="reward",
    build_rows=build_pair_rows,
    trainer_class=RewardTrainer,
)
