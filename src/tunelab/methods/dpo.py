"""`dpo`: Direct Preference Optimization (Rafailov et al., 2023), the sigmoid loss.

loss = -log sigmoid(beta * ((log p(chosen) - log p_ref(chosen)) - (log p(rejected) - log p_ref(rejected))))

log p is summed over the answer tokens. The reference model is `model_ref` when given; else, for a LoRA run, the
base model itself with the adapter switched off (no second copy in memory); else a frozen copy of the starting
model. The logged rewards are beta * (log p - log p_ref), as in TRL, so the two can be compared.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.nn.functional as F

from tunelab.config.llm import LLMParams
from tunelab.methods.base import Method
from tunelab.methods.preference import PreferenceTrainer, build_pair_rows, reward_metrics, sequence_sums

log = logging.getLogger("tunelab")


def dpo_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sigmoid DPO loss over summed answer log-probs, and the rewards TRL logs."""
    chosen_rewards = beta * (chosen - ref_chosen).detach()
    rejected_rewards = beta * (rejected - ref_rejected).detach()
    logits = (chosen - ref_chosen) - (rejected - ref_rejected)
    loss = -F.logsigmoid(beta * logits).mean()
    return loss, reward_metrics(chosen_rewards, rejected_rewards, chosen, rejected)


class DPOTrainer(PreferenceTrainer):
    def __init__(self, *args: Any, ref_model: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        unwrapped = self.accelerator.unwrap_model(self.model)
        if ref_model is None and self.params.model_ref:
            ref_model = load_reference(self.params)
        if ref_model is None and not hasattr(unwrapped, "disable_adapter"):
            log.info("dpo: reference model = a frozen copy of the starting model")
            ref_model = copy.deepcopy(unwrapped)
        if ref_model is not None:
            ref_model.requires_grad_(False).eval()
            ref_model.to(self.args.device)
        elif self.params.peft:
            log.info("dpo: reference model = the base model with the LoRA adapter switched off")
        self.ref_model = ref_model

    def reference_logps(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            if self.ref_model is not None:
                return self.token_logprobs(self.ref_model, batch, batch["labels"])
            with self.accelerator.unwrap_model(model).disable_adapter():
                return self.token_logprobs(model, batch, batch["labels"])

    def pair_loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        labels = batch["labels"]
        policy, _ = sequence_sums(self.token_logprobs(model, batch, labels), labels)
        reference, _ = sequence_sums(self.reference_logps(model, batch), labels)
        chosen, rejected = policy.chunk(2)
        ref_chosen, ref_rejected = reference.chunk(2)
        return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta)


def load_reference(params: LLMParams) -> Any:
    """The model named by `model_ref`, loaded like the base model (same dtype rules), frozen."""
    from tunelab.models import half_precision
    from tunelab.models.load import load_causal_lm, resolve_model

    half = half_precision(params)
    log.info("dpo: reference model = %s", params.model_ref)
    return load_causal_lm(resolve_model(params.model_ref), dtype=half or torch.float32)


METHOD = Method(
    model_kind="causal_lm",
    build_rows=build_pair_rows,
    trainer_class=DPOTrainer,
)
