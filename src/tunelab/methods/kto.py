"""`kto`: Kahneman-Tversky Optimization (Ethayarajh et al., 2024): single answers marked desirable or not.

With r = log p(answer) - log p_ref(answer) (summed over the answer tokens) and z a batch estimate of
KL(policy || reference), each answer's loss is

    desirable:    desirable_weight   * (1 - sigmoid(beta * (r - z)))
    undesirable:  undesirable_weight * (1 - sigmoid(beta * (z - r)))

averaged over the micro-batch (`kto_beta` is beta). `kto_loss_type apo_zero_unpaired` (APO-zero on single
answers, TRL's) drops z: desirable 1 - sigmoid(beta * r), undesirable sigmoid(beta * r), and with it the second
pass over mismatched answers. z is estimated as TRL does: every prompt of the micro-batch is
paired with the answer of the row before it (the last row's with the first's), z is the mean of
log p - log p_ref over those mismatched answers, clamped at 0, averaged over the processes and not
differentiated. The reference is DPO's (methods/dpo.py). When the classes are unbalanced and no weight is given,
the desirable weight is set so that desirable_weight * n_desirable / (undesirable_weight * n_undesirable) is 1,
the lower end of the paper's recommended [1, 4/3] (TRL warns outside that range; tunelab sets it and says so).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from tunelab.config.llm import LLMParams
from tunelab.data.kto import Labeled
from tunelab.data.tokenize import IGNORE
from tunelab.methods.base import REFERENCE_REWARDS, Method, PairEvaluation, RowStats
from tunelab.methods.dpo import DPOTrainer
from tunelab.methods.preference import reward_metrics, sequence_sums


def class_weights(items: list[Labeled], params: LLMParams) -> tuple[float, float, str]:
    """(desirable_weight, undesirable_weight, a line saying how they were chosen) for these answers."""
    n_good = sum(item.desirable for item in items)
    n_bad = len(items) - n_good
    good, bad = params.desirable_weight, params.undesirable_weight
    if good is None and bad is None and n_good != n_bad and n_good and n_bad:
        good, bad = round(n_bad / n_good, 4), 1.0
        how = "set to balance them: weight x count equal on both sides, as the KTO paper recommends"
    else:
        good, bad = good or 1.0, bad or 1.0
        ratio = good * n_good / (bad * max(n_bad, 1))
        how = "as given" if params.desirable_weight or params.undesirable_weight else "equal classes"
        if n_good and n_bad and not 1 <= ratio <= 4 / 3:  # (a held-out split may hold one kind only)
            how += (
                f"; desirable_weight * n_desirable / (undesirable_weight * n_undesirable) is {ratio:.2f}, outside "
                f"the KTO paper's [1, 4/3]: desirable_weight in [{n_bad * bad / n_good:.2f}, "
                f"{4 / 3 * n_bad * bad / n_good:.2f}] would bring it in"
            )
    line = f"kto: {n_good} desirable and {n_bad} undesirable answers; desirable_weight {good:g}, "
    return good, bad, line + f"undesirable_weight {bad:g} ({how})"


def build_kto_rows(items: list[Labeled], params: LLMParams) -> tuple[list[Any], RowStats]:
    """Every answer is a row; the class weights the trainer will use are stated with the rows."""
    stats = RowStats(examples=len(items), rows=len(items))
    if items:
        stats.notes.append(class_weights(items, params)[2])
    return list(items), stats


class KTOCollator:
    """Rows -> each prompt + its answer, and each prompt + the previous row's answer (for the KL estimate), padded
    on the right; `labels` mark the answer tokens, `desirable` says which answers are."""

    def __init__(self, pad_id: int, block_size: int, kl: bool = True) -> None:
        self.pad_id, self.block_size, self.kl = pad_id, block_size, kl

    def __call__(self, items: list[Labeled]) -> dict[str, torch.Tensor]:
        prompts = [item.prompt_ids for item in items]
        answers = [item.completion_ids for item in items]
        batch = self._pad(prompts, answers)
        if self.kl:  # (not for a loss without the KL estimate)
            shifted = answers[-1:] + answers[:-1]  # TRL's rotation: row i is scored on row i-1's answer
            kl = self._pad(prompts, shifted)
            batch.update({f"kl_{key}": value for key, value in kl.items()})
        batch["desirable"] = torch.tensor([item.desirable for item in items], dtype=torch.bool)
        return batch

    def _pad(self, prompts: list[list[int]], answers: list[list[int]]) -> dict[str, torch.Tensor]:
        rows = [(p, a[: max(0, self.block_size - len(p))]) for p, a in zip(prompts, answers, strict=True)]
        width = max(len(p) + len(a) for p, a in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, (prompt, answer) in enumerate(rows):
            n = len(prompt) + len(answer)
            ids[row, :n] = torch.tensor(prompt + answer)
            labels[row, len(prompt) : n] = torch.tensor(answer, dtype=torch.long)
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def kto_loss(
    policy: torch.Tensor,
    reference: torch.Tensor,
    kl: torch.Tensor,
    desirable: torch.Tensor,
    beta: float,
    weights: tuple[float, float] = (1.0, 1.0),
    loss_type: str = "kto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The KTO loss (or apo_zero_unpaired's, which reads no KL: pass 0) from each answer's summed log-prob under the
    policy and the reference, the KL estimate z (a detached scalar), which answers are desirable; and the figures
    TRL logs."""
    ratios = policy - reference
    good, bad = ratios[desirable], ratios[~desirable]
    if loss_type == "apo_zero_unpaired":
        good_losses, bad_losses = 1 - F.sigmoid(beta * good), F.sigmoid(beta * bad)
    else:
        good_losses, bad_losses = 1 - F.sigmoid(beta * (good - kl)), 1 - F.sigmoid(beta * (kl - bad))
    losses = torch.cat((weights[0] * good_losses, weights[1] * bad_losses))
    metrics = {"kl": kl.detach()}
    if len(good):
        metrics["rewards/chosen"] = beta * good.detach().mean()
        metrics["logps/chosen"] = policy[desirable].detach().mean()
    if len(bad):
        metrics["rewards/rejected"] = beta * bad.detach().mean()
        metrics["logps/rejected"] = policy[~desirable].detach().mean()
    if len(good) and len(bad):
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return losses.nanmean(), metrics


class KTOTrainer(DPOTrainer):
    """DPO's reference handling, KTO's batches and loss."""

    def __init__(self, *args: Any, params: LLMParams, **kwargs: Any) -> None:
        if kwargs.get("data_collator") is None:
            kl = params.kto_loss_type == "kto"
            kwargs["data_collator"] = KTOCollator(kwargs["processing_class"].pad_token_id, params.block_size, kl)
        super().__init__(*args, params=params, **kwargs)
        self.beta = params.kto_beta
        rows = getattr(self.train_dataset, "rows", None)
        given = (params.desirable_weight or 1.0, params.undesirable_weight or 1.0)
        self.class_weights = class_weights(list(rows), params)[:2] if rows else given

    def pair_loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        labels = batch["labels"]
        policy, _ = sequence_sums(self.token_logprobs(model, batch, labels, policy=True), labels)
        reference, _ = sequence_sums(self.reference_logps(model, batch), labels)
        loss_type = self.params.kto_loss_type
        return kto_loss(
            policy, reference, self.kl_estimate(model, batch), batch["desirable"], self.beta, self.class_weights,
            loss_type,
        )  # fmt: skip

    def kl_estimate(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """z: the mean log-ratio of the mismatched answers, over every process, clamped at 0 (0 without them)."""
        if "kl_labels" not in batch:  # apo_zero_unpaired: no estimate (TRL logs 0)
            return torch.zeros((), device=batch["labels"].device)
        kl_labels = batch["kl_labels"]
        kl_batch = {"input_ids": batch["kl_input_ids"], "attention_mask": batch["kl_attention_mask"]}
        kl_batch["labels"] = kl_labels
        with torch.no_grad():
            kl_policy, _ = sequence_sums(self.token_logprobs(model, kl_batch, kl_labels), kl_labels)
        kl_reference, _ = sequence_sums(self.reference_logps(model, kl_batch), kl_labels)
        kl = (kl_policy - kl_reference).mean().detach()
        return self.accelerator.gather_for_metrics(kl).mean().clamp(min=0)


def pair_figures(params: LLMParams, rows: list[Any], pairs: Any, policy: Any, reference: Any) -> dict[str, Any]:
    """`tunelab evaluate`'s figures of a kto run (methods/base.PairEvaluation): on answers, the loss function's
    (its KL estimate left out: it pairs each batch's answers with the next row's); on answers read from pairs,
    DPO's reward figures per pair, with kto_beta."""
    sums, ref = policy[0], reference[0]
    if pairs is not None:
        good, bad = [i for i, _ in pairs], [j for _, j in pairs]
        rewards = params.kto_beta * (sums[:, 0] - ref[:, 0])
        return reward_metrics(rewards[good], rewards[bad], sums[good, 0], sums[bad, 0])
    desirable = torch.tensor([row.desirable for row in rows], dtype=torch.bool)
    _, found = kto_loss(
        sums[:, 0], ref[:, 0], torch.zeros(()), desirable, params.kto_beta, loss_type=params.kto_loss_type
    )
    return found


METHOD = Method(
    model_kind="causal_lm",
    build_rows=build_kto_rows,
    trainer_class=KTOTrainer,
    evaluation=PairEvaluation(pair_figures, "kto_beta", REFERENCE_REWARDS),
)
