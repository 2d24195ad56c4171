"""`reward`: a reward model, a sequence classifier with one output trained so chosen outscores rejected.

loss = -log sigmoid(r(prompt + chosen) - r(prompt + rejected))  (Bradley-Terry)

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


def reward_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    chosen, rejected = chosen.float(), rejected.float()
    loss = -F.logsigmoid(chosen - rejected).mean()
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
        return reward_loss(chosen, rejected)


METHOD = Method(
    model_kind="reward",
    build_rows=build_pair_rows,
    trainer_class=RewardTrainer,
)
