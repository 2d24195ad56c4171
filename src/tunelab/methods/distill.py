"""`distill`: knowledge distillation. The model learns a teacher's next-token distributions on the data's answers,
not only the one token the data holds there.

The rows are sft's (chat, prompt/completion, Alpaca or text rows; packed or not; the loss where sft's is). At each
of those positions the student's and the teacher's distributions are compared by TRL's generalized JSD
(GKDTrainer with lmbda 0: the data's own answers, no sampling), beta choosing forward KL, reverse KL or between,
both softened by distill_temperature; distill_ce_weight adds the usual cross-entropy. The teacher is frozen, in
the run's precision, and runs the same batch under no_grad; both heads are projected a chunk of positions at a
time (speed/divergence.py), so neither model's full-vocabulary logits exist.

On-policy (`distill_lmbda`, GKD's lmbda): that share of the micro-batches, drawn per step from the run's seed, has
its answers written by the model itself, sampled at distill_temperature from each row's prompt (everything before
the row's last trained stretch, i.e. the last answer) when the optimizer step starts; the teacher's distributions
are then learned at the tokens the model actually writes, so its mistakes are where it is taught (GKD; Qwen3's
and Thinking Machines' on-policy distillation). `distill_seq_kd`: the other micro-batches' answers are the
teacher's own samples (sequence-level KD). Either way the loss is normalised by the tokens of the step's new
answers. Evaluation keeps the data's answers.

The teacher must read the same tokens and predict over the same vocabulary (models/checks.check_teacher, before
anything loads): a larger model of the same family, or the model itself fully trained before a LoRA or a smaller
copy.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import torch

from tunelab.data.tokenize import IGNORE
from tunelab.errors import DataError
from tunelab.methods.base import Method
from tunelab.methods.completions import completion_length, sampling_config
from tunelab.methods.sft import build_rows
from tunelab.models import load_teacher
from tunelab.models.turns import turn_end
from tunelab.speed import pad_multiple
from tunelab.speed.divergence import divergence_sum, divergence_sum_plain
from tunelab.speed.loss import fast_loss_supported, head_dtype, output_head_returns_hidden
from tunelab.training.trainer import TunelabTrainer, eval_mode

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
        self.samples = params.distill_lmbda > 0 or params.distill_seq_kd
        if self.samples:
            # Where a sampled answer ends: as grpo ends its completions (EOS, and the template's turn end)
            self.end_ids = turn_end(self.processing_class, self.accelerator.unwrap_model(self.model))[0]
            # one row per example, so each has its own prompt (not flash-attention's rows end to end in one)
            if hasattr(self.data_collator, "flat"):
                self.data_collator.flat = False
            _check_prompts(self.train_dataset)
            log.info(
                "distill: %s of the micro-batches answered by the model itself%s, up to %d tokens",
                f"{params.distill_lmbda:.0%}",
                ", the others by the teacher" if params.distill_seq_kd else "",
                completion_length(params),
            )

    def get_batch_samples(self, epoch_iterator, num_batches, device):  # noqa: D102
        batches, items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not self.samples or not batches:
            return batches, items
        params = self.params
        # The same draws, and (seeded below) the same samples, in a resumed run; the draws the same in every
        # process (their micro-batches are sampled, or not, together)
        draw = random.Random(f"{self.args.seed}:{self.state.global_step}")
        for index, batch in enumerate(batches):
            if draw.random() < params.distill_lmbda:
                writer = self.accelerator.unwrap_model(self.model)
            elif params.distill_seq_kd:
                writer = self.teacher
            else:
                continue
            batches[index] = self.answered_by(writer, batch, index)
        # the step's loss is divided by its trained tokens: those of the new answers
        return batches, self._get_num_items_in_batch(batches, device)

    @torch.no_grad()
    def answered_by(self, writer: Any, batch: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
        """The batch with each row's last answer replaced by one `writer` samples from the row's prompt (everything
        before the last trained stretch): right-padded rows, as the collator makes them, labels on the new answer
        through its end token, no row longer than block_size. A row without a prompt (trained whole) keeps its
        own answer."""
        pad = self.processing_class.pad_token_id
        rows = [_split_row(ids, labels) for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True)]
        prompts = [prompt for prompt, _ in rows if len(prompt) > 1]
        if not prompts:
            return batch
        width = max(len(p) for p in prompts)
        device = self.args.device
        prompt_ids = torch.full((len(prompts), width), pad, dtype=torch.long, device=device)
        prompt_mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):  # left padding: every prompt ends where sampling starts
            prompt_ids[row, width - len(prompt) :] = torch.tensor(prompt, device=device)
            prompt_mask[row, width - len(prompt) :] = 1
        process = self.accelerator.process_index
        torch.manual_seed(self.args.seed + 1009 * self.state.global_step + 31 * index + 7919 * process)
        room = max(1, self.params.block_size - width)
        config = sampling_config(self.params.distill_temperature, min(completion_length(self.params), room), pad)
        config.eos_token_id = self.end_ids
        with eval_mode(writer):
            out = writer.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)
        samples = iter(out[:, width:].tolist())
        new_rows = []
        for prompt, own in rows:
            if len(prompt) <= 1:  # no prompt to answer: the row as the data has it
                new_rows.append(own)
                continue
            sampled = next(samples)
            ends = [i for i, token in enumerate(sampled) if token in self.end_ids]
            answer = (sampled[: ends[0] + 1] if ends else sampled)[: self.params.block_size - len(prompt)]
            new_rows.append((prompt + answer, [IGNORE] * len(prompt) + answer))
        rows = new_rows
        longest = max(len(ids) for ids, _ in rows)
        multiple = pad_multiple()
        longest = -(-longest // multiple) * multiple
        input_ids = [ids + [pad] * (longest - len(ids)) for ids, _ in rows]
        labels = [labs + [IGNORE] * (longest - len(labs)) for _, labs in rows]
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long, device=batch["input_ids"].device),
            "labels": torch.tensor(labels, dtype=torch.long, device=batch["labels"].device),
        }

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


def _split_row(ids: torch.Tensor, labels: torch.Tensor) -> tuple[list[int], tuple[list[int], list[int]]]:
    """A row's prompt (its tokens before the last stretch of trained labels, the last answer) and the row as it
    is, through its last trained token (ids, labels: the padding after it left out)."""
    trained = (labels != IGNORE).tolist()
    end = max(i for i, is_trained in enumerate(trained) if is_trained)
    start = end
    while start > 0 and trained[start - 1]:
        start -= 1
    return ids[:start].tolist(), (ids[: end + 1].tolist(), labels[: end + 1].tolist())


def _check_prompts(rows: Any) -> None:
    """Sampling answers needs a prompt before each row's answer; rows trained whole (plain text) have none."""
    if isinstance(rows, torch.utils.data.IterableDataset):  # streamed: their rows are the same kind throughout
        return
    for row in (rows[i] for i in range(min(len(rows), 64))):
        first = next((i for i, label in enumerate(row.labels) if label != IGNORE), 0)
        if first <= 1:
            raise DataError(
                "distill_lmbda / distill_seq_kd write each row's answer anew from its prompt, but the rows are "
                "trained whole (plain text rows have no prompt): use prompt/completion or chat rows"
            )


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
