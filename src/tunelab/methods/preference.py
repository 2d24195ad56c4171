"""What the preference methods (dpo, orpo, simpo, reward) share: batches of pairs, completion log-probs, metrics.

A batch holds every pair's prompt + chosen answer, then every pair's prompt + rejected answer (2B rows, padded
on the right), so one forward pass scores both sides. Log-probabilities come from the hidden states, projected
only at answer positions and in chunks (loss.token_logprobs), so full-vocabulary logits never exist.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from tunelab.config.llm import LLMParams
from tunelab.data.preference import Pair
from tunelab.data.tokenize import IGNORE
from tunelab.methods.base import RowStats
from tunelab.speed.loss import (
    fast_loss_supported,
    logits_log_sum_sq_probs,
    logits_token_logprobs,
    output_head_returns_hidden,
    token_log_sum_sq_probs,
    token_logprobs,
)
from tunelab.training.trainer import GuardedTrainer, disable_dropout


def build_pair_rows(pairs: list[Pair], params: LLMParams) -> tuple[list[Any], RowStats]:
    """Pairs are already cut to the length rules when loaded (data/preference.py); each pair is a row."""
    return list(pairs), RowStats(examples=len(pairs), rows=len(pairs))


class PairCollator:
    """Pairs -> input_ids / attention_mask / labels of shape (2B, L): chosen rows first, then rejected.

    `labels` mark the answer tokens (prompt and padding are -100). `images`: a vision-language run's
    data/images.ImageCodec: the pixels of each pair's prompt images (once per row: the chosen and the rejected row
    each show them) and the per-token types go under `image_inputs`, passed to the model with the ids, and where
    the images' tokens are under `image_tokens` (True there: never a target, as in sft).
    """

    def __init__(self, pad_id: int, images: Any = None) -> None:
        self.pad_id = pad_id
        self.images = images

    def __call__(self, pairs: list[Pair]) -> dict[str, Any]:
        batch: dict[str, Any] = self._rows(pairs)
        if self.images is not None:
            shown = [[span.ref for span in pair.images or ()] for pair in pairs] * 2
            batch["image_inputs"] = self.images.batch_inputs(shown, batch["input_ids"])
            batch["image_tokens"] = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
            for row, pair in enumerate(pairs * 2):
                for span in pair.images or ():
                    batch["image_tokens"][row, span.start : span.start + span.count] = True
        if pairs and getattr(pairs[0], "margin", None) is not None:  # reward's margins (margin_column)
            batch["margin"] = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
        if pairs and hasattr(pairs[0], "ref_chosen"):  # dpo's reference log-probs, scored before training
            batch["ref_logps"] = torch.tensor([p.ref_chosen for p in pairs] + [p.ref_rejected for p in pairs])
        return batch

    def _rows(self, pairs: list[Pair]) -> dict[str, torch.Tensor]:
        prompts = [p.prompt_ids for p in pairs] * 2
        answers = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
        width = max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True))
        ids = torch.full((len(answers), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(answers), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(answers), width), dtype=torch.long)
        for row, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
            n = len(prompt) + len(answer)
            ids[row, :n] = torch.tensor(prompt + answer)
            labels[row, len(prompt) : n] = torch.tensor(answer)
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class PreferenceTrainer(GuardedTrainer):
    """Trainer for pair losses: subclasses define `pair_loss(model, batch) -> (loss, metrics)`; metrics are
    averaged over the steps between two logs and logged with the loss (eval ones with the `eval_` prefix)."""

    def __init__(self, *args: Any, params: LLMParams, images: Any = None, **kwargs: Any) -> None:
        if kwargs.get("data_collator") is None:
            kwargs["data_collator"] = PairCollator(kwargs["processing_class"].pad_token_id, images)
        # Batches of pairs of similar length (a Pair's len() is what its rows pad to): less padding.
        kwargs.setdefault("group_by_length", params.group_by_length)
        super().__init__(*args, **kwargs)
        # Pair losses are means over the micro-batch's pairs: Trainer divides them by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.params = params
        self.beta = params.dpo_beta
        self.fast_loss = params.fast_loss and fast_loss_supported(self.accelerator.unwrap_model(self.model))
        self.trained_tokens = 0
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        disable_dropout(self.model)

    def pair_loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: D102
        loss, metrics = self.pair_loss(model, inputs)
        loss = self.add_balancing(loss, model.training)  # (a mean: Trainer divides it by the accumulation steps)
        mode = "train" if model.training else "eval"
        if model.training:
            self.trained_tokens += int((inputs["labels"] != IGNORE).sum())
        for name, value in metrics.items():
            self._metrics[mode][name].append(float(value))
        return (loss, {}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):  # noqa: D102
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:  # noqa: D102
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        logs.update({prefix + name: value for name, value in self.process_means(self._metrics[mode]).items()})
        self._metrics[mode].clear()
        super().log(logs, start_time)

    def token_logprobs(
        self, model: Any, batch: dict[str, torch.Tensor], labels: torch.Tensor, policy: bool = False
    ) -> torch.Tensor:
        """log p(next token) at every position whose label is set, (2B, L - 1), zero elsewhere. `policy`: the
        trained forward of the step, whose mixture of experts' balancing loss the loss adds (not a reference's)."""
        unwrapped = self.accelerator.unwrap_model(model)
        fast = self.fast_loss_now(unwrapped)
        return answer_logprobs(model, unwrapped, batch, labels, fast, balance=self if policy else None)[0]


def answer_logprobs(
    model: Any,
    unwrapped: Any,
    batch: dict[str, torch.Tensor],
    labels: torch.Tensor,
    fast: bool,
    squares: bool = False,
    balance: GuardedTrainer | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(next token) where `labels` is set, from hidden states projected there in chunks (`fast`) or from the
    logits; `unwrapped` is the model under any DDP/FSDP wrapper (its output head is swapped). With `squares`, also
    log sum_v p(v)^2 at the same positions, without gradient (dpo's WPO weights), else None. `balance`: the trainer
    that keeps this forward's mixture-of-experts balancing loss (the policy's forward), over the unpadded tokens.
    A batch's `image_inputs` (PairCollator) go to the model too."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    inputs.update(batch.get("image_inputs", {}))
    routing = balance.routing() if balance is not None else {}
    if fast:
        with output_head_returns_hidden(unwrapped) as head:
            outputs = model(**inputs, **routing)
        if balance is not None:
            balance.keep_balancing(outputs, batch["attention_mask"])
        hidden = outputs.logits
        logps = token_logprobs(hidden, head, labels)
        return logps, (token_log_sum_sq_probs(hidden, head, labels) if squares else None)
    outputs = model(**inputs, **routing)
    if balance is not None:
        balance.keep_balancing(outputs, batch["attention_mask"])
    logits = outputs.logits
    return logits_token_logprobs(logits, labels), (logits_log_sum_sq_probs(logits, labels) if squares else None)


def sequence_sums(per_token: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-prob of the answer tokens and how many there are."""
    scored = labels[:, 1:] != IGNORE
    return (per_token * scored).sum(-1), scored.sum(-1)


def score_answers(
    model: Any,
    rows: list[Any],
    collate: Any,
    batch_size: int,
    fast: bool,
    device: Any,
    summed: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] = sequence_sums,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed answer log-probs and answer-token counts of every row under `model`, without gradients, as two
    float32 / int64 tensors of shape (len(rows), k): k the sequences `collate` makes of one row (a Pair: chosen, then
    rejected; a kto answer: 1). Rows go in batches of similar lengths (little padding). dpo's reference scoring
    (precompute_ref_log_probs) and `tunelab evaluate` on a preference run call it. `summed` turns a batch's
    per-token log-probs into (sums, counts): sequence_sums, or dpo's LD-DPO weighting (dpo.length_desensitised)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    sums = counts = torch.zeros((0, 1))
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            collated = collate([rows[i] for i in chosen])
            batch = {key: collated[key].to(device) for key in ("input_ids", "attention_mask", "labels")}
            if "image_inputs" in collated:
                batch["image_inputs"] = {key: value.to(device) for key, value in collated["image_inputs"].items()}
            logps, _ = answer_logprobs(model, model, batch, batch["labels"], fast)
            batch_sums, batch_counts = summed(logps, batch["labels"])
            k = len(batch_sums) // len(chosen)  # sequences per row, in blocks (every chosen, then every rejected)
            if start == 0:
                sums, counts = torch.zeros((len(rows), k)), torch.zeros((len(rows), k), dtype=torch.long)
            sums[chosen] = torch.stack(batch_sums.float().chunk(k), dim=1).cpu()
            counts[chosen] = torch.stack(batch_counts.chunk(k), dim=1).cpu()
    return sums, counts


def reward_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The rewards/* and logps/* figures DPO and ORPO log, under TRL's names."""
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }
