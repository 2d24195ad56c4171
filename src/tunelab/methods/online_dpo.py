"""`online_dpo`: online DPO (Guo et al., 2024, "Direct Language Model Alignment from Online AI Feedback"), as TRL's
OnlineDPOTrainer trains it: for each prompt the policy samples two completions, the rewards (every sampling
method's: built-ins, Python functions, reward models) pick the better one as chosen, and DPO's loss trains on the
pair against the reference (the base with the adapter off, a frozen copy of the model, or model_ref):

    reward_i = the weighted sum of the rewards - missing_eos_penalty if completion i was cut at
               max_completion_length (TRL's; before the two are compared)
    chosen   = the one of a prompt's two completions with the higher reward; a tie makes no pair (it says nothing
               of which is better: with a sparse reward most pairs tie), unless keep_tied_pairs, TRL's rule (the
               first is chosen)
    loss     = dpo_loss_type's loss (methods/dpo.DPOLoss: sigmoid by default, any of dpo's, with dpo_beta,
               label_smoothing...) on the pair's summed log-probabilities, the policy's and the reference's

The sampling, the rewards, the samples written and the fast log-probabilities are methods/sampling.py's. The
log-probabilities are the model's own (temperature 1, as DPO and TRL's OnlineDPOTrainer score them), not the
sampling temperature's. A prompt whose two completions no reward scored has no pair. Where TRL's OnlineDPOTrainer
offers sigmoid and ipo, every dpo_loss_type works here: its ipo is DPOTrainer's (per answer token, as dpo's), the
experimental trainer's ipo is of the sums.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tunelab.config.llm import LLMParams
from tunelab.methods.base import Method
from tunelab.methods.dpo import DPOLoss
from tunelab.methods.sampling import SamplingTrainer, build_prompt_rows
from tunelab.training.trainer import disable_dropout


def online_pairs(rewards: torch.Tensor, keep_ties: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prompt's two completions (rows 2i and 2i + 1, as sampled) as (chosen rows, rejected rows): the one with
    the higher reward chosen, an unscored one (NaN) losing to a scored one. A prompt with neither scored is left
    out, and so is a tie unless `keep_ties` (TRL's rule: the first is chosen)."""
    first, second = rewards.view(-1, 2).unbind(1)
    scored = ~(first.isnan() & second.isnan())
    if not keep_ties:
        scored &= first.nan_to_num(nan=-math.inf) != second.nan_to_num(nan=-math.inf)
    first_wins = first.nan_to_num(nan=-math.inf) >= second.nan_to_num(nan=-math.inf)
    rows = torch.arange(len(first), device=rewards.device) * 2
    chosen, rejected = torch.where(first_wins, rows, rows + 1), torch.where(first_wins, rows + 1, rows)
    return chosen[scored], rejected[scored]


class OnlineDPOTrainer(SamplingTrainer):
    """Rollouts of two completions a prompt, ranked by the rewards into a pair, with DPO's loss."""

    scores_at_temperature = False

    def __init__(self, *args: Any, params: LLMParams, **kwargs: Any) -> None:
        super().__init__(*args, params=params, **kwargs)
        self.dpo_loss = DPOLoss.of(params)
        # the policy and the reference scored alike: a dropout mask in one pass only would move the log-ratios with
        # no change to the policy (TRL's disable_dropout, as tunelab's dpo)
        disable_dropout(self.model)

    def reference_weight(self, params: LLMParams) -> float:  # noqa: D102
        return params.dpo_beta  # (never 0: the reference is always scored)

    def advantages_of(self, total, batch, per_function=None):  # noqa: D102
        # the rewards themselves, the penalty taken (compute_loss ranks each prompt's two)
        penalty = self.params.missing_eos_penalty
        if penalty:
            total = total - penalty * batch["truncated"].float().cpu()
        return total, None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: D102
        mask = inputs["completion_mask"]
        sums = (self.completion_logps(model, inputs, policy=True) * mask).sum(1)
        reference = (inputs["ref_logps"] * mask).sum(1)
        rewards = inputs["advantages"]  # (the sampling's name for what a loss trains on: here the rewards)
        chosen, rejected = online_pairs(rewards, self.params.keep_tied_pairs)
        if len(chosen):
            counts = mask.sum(1)
            loss, metrics = self.dpo_loss(
                sums[chosen], sums[rejected], reference[chosen], reference[rejected],
                counts=(counts[chosen], counts[rejected]),
            )  # fmt: skip
            gaps = rewards[chosen] - rewards[rejected]  # (an unscored rejected one: no figure for that pair)
            if not gaps.isnan().all():
                metrics["objective/scores_margin"] = gaps.nanmean()
        else:  # no pair to learn from: a zero loss that still reaches every trained weight
            loss, metrics = sums.sum() * 0.0, {}
        metrics["objective/kl"] = (sums - reference).detach().mean()
        loss = self.finished_loss(loss, metrics, mask, model.training)
        return (loss, {}) if return_outputs else loss


METHOD = Method(model_kind="causal_lm", build_rows=build_prompt_rows, trainer_class=OnlineDPOTrainer)
