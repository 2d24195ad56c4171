"""`distill`: knowledge distillation. The model learns a teacher's next-token distributions on the data's answers,
not only the one token the data holds there.

The rows are sft's (chat, prompt/completion, Alpaca or text rows; packed or not; the loss where sft's is). At each
of those positions the student's and the teacher's distributions are compared by TRL's generalized JSD
(GKDTrainer with lmbda 0: the data's own answers, no sampling), beta choosing forward KL, reverse KL or between,
both softened by distill_temperature; distill_ce_weight adds the usual cross-entropy. The teacher is frozen, in
the run's precision, and runs the same batch under no_grad; both heads are projected a chunk of positions at a
time (speed/divergence.py), so neither model's full-vocabulary logits exist.

The teacher must read the same tokens and predict over the same vocabulary (models/checks.check_teacher, before
anything loads): a larger model of the same family, or the model itself fully trained before a LoRA or a smaller
copy.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from tunelab.methods.base import Method
from tunelab.methods.sft import build_rows
from tunelab.models import load_teacher
from tunelab.speed.divergence import divergence_sum, divergence_sum_plain
from tunelab.speed.loss import fast_loss_supported, head_dtype, output_head_returns_hidden
from tunelab.training.trainer import TunelabTrainer

log = logging.getLogger("tunelab")


class DistillTrainer(TunelabTrainer):
    """TunelabTrainer whose summed loss is the divergence from the teacher at the trained positions."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        params = self.params
        log.info(
            "distill: teacher = %s; divergence %s at temperature %g%s",
            params.teacher_model,
            _divergence_name(params.distill_beta),
            params.distill_temperature,
            f", plus {params.distill_ce_weight:g} x cross-entropy" if params.distill_ce_weight else "",
        )
        self.teacher = load_teacher(params).requires_grad_(False).eval().to(self.args.device)
        self.teacher_chunks = _takes_chunks(self.teacher) and fast_loss_supported(self.teacher)

    def loss_sum(self, model: Any, inputs: dict[str, Any], labels: torch.Tensor) -> tuple[torch.Tensor, int]:  # noqa: D102
        params = self.params
        settings = (params.distill_beta, params.distill_temperature, params.distill_ce_weight)
        shift = labels[:, 1:]
        mask = shift != -100
        unwrapped = self.accelerator.unwrap_model(model)
        # The chunks take plain heads (a LoRA head's low-rank term is the cross-entropy's alone, speed/loss.py) whose
        # logits are the head's product as it is (fast_loss_supported: no soft-capping or logit scale).
        tokens = len(self.processing_class)  # the ids compared: a padded head's spare rows are no tokens
        if self.fast_loss_now(unwrapped) and _takes_chunks(unwrapped) and self.teacher_chunks:
            with output_head_returns_hidden(unwrapped) as head:
                hidden = model(**inputs, use_cache=False).logits
            with torch.no_grad(), output_head_returns_hidden(self.teacher) as teacher_head:
                teacher_hidden = self.teacher(**inputs, use_cache=False).logits
            total = divergence_sum(
                hidden[:, :-1][mask], head, teacher_hidden[:, :-1][mask], teacher_head, shift[mask], *settings,
                head_dtype(head), head_dtype(teacher_head), tokens,
            )  # fmt: skip
            return total, int(mask.sum())
        logits = model(**inputs, use_cache=False).logits
        with torch.no_grad():
            teacher_logits = self.teacher(**inputs, use_cache=False).logits
        total = divergence_sum_plain(
            logits[:, :-1][mask], teacher_logits[:, :-1][mask], shift[mask], *settings, tokens
        )
        return total, int(mask.sum())


def _takes_chunks(model: Any) -> bool:
    """A model whose head the chunks can project: a plain linear layer (no adapter on it)."""
    head = model.get_output_embeddings()
    return head is not None and getattr(head, "base_layer", None) is None and head.weight.dim() == 2


def _divergence_name(beta: float) -> str:
    if beta == 0:
        return "forward KL(teacher || model)"
    if beta == 1:
        return "reverse KL(model || teacher)"
    return f"generalized JSD (beta {beta:g})"


METHOD = Method(model_kind="causal_lm", build_rows=build_rows, trainer_class=DistillTrainer, perplexity=False)
