"""What the methods that sample from prompts (grpo, rloo, online_dpo) share: SamplingTrainer.

Each optimizer step, every prompt of the step's batches gets `num_generations` sampled completions (online_dpo:
two; how they are sampled, with tools too: methods/completions.py's CompletionSampler). The rewards
(rewards.py: built-ins, Python functions, reward models) score them, and the method turns the scores into what its
loss trains on (`advantages_of`: grpo's group-normalised advantages, rloo's leave-one-out ones, online_dpo's pairs).
A completion ends at its first end token: the tokenizer's EOS, the model's generation config's, and the chat
template's turn end (models/turns.py). The log-probabilities come from the hidden states at completion positions
only (speed/loss.token_logprobs): full-vocabulary logits never exist. The figures are logged as TRL's trainers log
them, and every `completions_every` steps a few completions go to completions.jsonl with what each reward made of
them.

`num_iterations` (mu): each step's prompts come round mu steps in a row (RepeatedBlocks); the first samples and
scores them, the next reuse those completions, so generation runs once every mu steps. p_old is the policy's own
log-prob in the batch's first step (kept from that pass: no extra forward), so later steps' ratios measure how far
the policy has moved since it sampled. `steps_per_generation` (k x gradient_accumulation, TRL's) samples k steps'
prompts at once: the first step trains on its share at once, each later one on completions of the policy before
the earlier steps' updates, against their log-probs under it (scored when sampled: one forward without gradient).
With both, a sampling serves k x mu steps: its k steps, mu times over. A run resumed inside them samples each
step afresh.

`batch_size` counts prompts: a micro-batch is batch_size x num_generations completions (TRL's
per_device_train_batch_size counts completions: TRL's 8 with num_generations 8 is tunelab's batch_size 1).
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tunelab.config.llm import LLMParams
from tunelab.data.prompts import PromptRow
from tunelab.errors import DataError
from tunelab.methods.base import RowStats
from tunelab.methods.completions import CompletionSampler, Sampled, completion_length
from tunelab.models import load_reference
from tunelab.models.turns import turn_end
from tunelab.rewards import ModelReward, Reward, call_reward, load_rewards
from tunelab.speed.loss import (
    fast_loss_supported,
    logits_entropies,
    logits_token_logprobs,
    output_head_returns_hidden,
    token_logprobs,
    token_logprobs_and_entropies,
)
from tunelab.tools import ToolRunner, load_tools, transcript
from tunelab.training.reference import load_synced, save_synced, start_syncing
from tunelab.training.trainer import GuardedTrainer, disable_dropout

log = logging.getLogger("tunelab")

COMPLETIONS_FILE = "completions.jsonl"


def clip_range(params: LLMParams) -> tuple[float, float]:
    """(epsilon low, epsilon high) of the policy-gradient methods' clipped ratio, 1 - low to 1 + high: epsilon_high
    is epsilon unless given (TRL's)."""
    return params.epsilon, params.epsilon_high if params.epsilon_high is not None else params.epsilon


def nanstd(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Standard deviation ignoring NaNs, with Bessel's correction (NaN with fewer than two values)."""
    mean = torch.nanmean(values, dim=dim, keepdim=True)
    variance = torch.nanmean((values - mean) ** 2, dim=dim, keepdim=True)
    count = (~torch.isnan(values)).sum(dim=dim, keepdim=True)
    variance = variance * torch.where(count > 1, count / (count - 1), torch.full_like(variance, float("nan")))
    std = variance.sqrt()
    return std.squeeze(dim) if dim is not None else std.reshape(())


class RepeatedBlocks(torch.utils.data.Sampler):
    """num_iterations, steps_per_generation: a random order of the prompts (seeded by the run's seed and the epoch,
    so a resumed run sees the same one), cut into blocks of one sampling's prompts (its steps', every process's),
    each block given `repeats` times in a row. A last block short of a sampling is left out (its repeats would
    straddle two samplings)."""

    def __init__(self, size: int, block: int, repeats: int, seed: int) -> None:
        self.size, self.block, self.repeats, self.seed = size, block, repeats, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        for start in range(0, self.size - self.block + 1, self.block):
            for _ in range(self.repeats):
                yield from order[start : start + self.block]

    def __len__(self) -> int:
        return (self.size // self.block) * self.block * self.repeats


class FirstPass:
    """Where a reused batch keeps its completions' log-probs from its first step, the sampling policy's (p_old).
    Trainer copies a batch's tensors each time it is used, but passes this object through as it is."""

    def __init__(self) -> None:
        self.logps: torch.Tensor | None = None

    def old_logps(self, logps: torch.Tensor, training: bool) -> torch.Tensor:
        """p_old for this pass: the first training pass's log-probs (this pass's own if it is the first)."""
        if self.logps is None and training:
            self.logps = logps.detach()
        return self.logps if self.logps is not None and training else logps.detach()


def check_repeatable(prompts: int, iterations: int, step_prompts: int, steps: int = 1) -> None:
    """num_iterations repeats whole steps of prompts, steps_per_generation samples `steps` steps' at once: refused,
    in one line, where there is not one sampling's worth."""
    if steps > 1 and prompts < step_prompts * steps:
        raise DataError(
            f"steps_per_generation samples {steps} steps' prompts at once: it needs at least that many prompts "
            f"(batch_size x gradient_accumulation x processes x {steps} = {step_prompts * steps}), got {prompts}"
        )
    if iterations > 1 and prompts < step_prompts:
        raise DataError(
            f"num_iterations {iterations} trains each step's prompts again in the next steps: it needs at least one "
            f"step's worth of prompts (batch_size x gradient_accumulation x processes = {step_prompts}), got "
            f"{prompts}"
        )


def build_prompt_rows(prompts: list[PromptRow], params: LLMParams) -> tuple[list[Any], RowStats]:
    """Each prompt is a row (a micro-batch of batch_size rows becomes batch_size x num_generations completions)."""
    return list(prompts), RowStats(examples=len(prompts), rows=len(prompts))


class SamplingTrainer(CompletionSampler, GuardedTrainer):
    """Samples completions of the prompts, scores them with the rewards and hands them to the method's loss
    (`advantages_of`, `compute_loss`); logs the rewards and writes samples to completions.jsonl."""

    samples_whole_steps = True  # (the out-of-memory advice names prompts_per_generation)
    # The completions are scored at the sampling temperature (the policy that sampled them, as TRL's GRPO scores
    # them); online_dpo scores them at 1, the model's own distribution, as DPO does.
    scores_at_temperature = True

    def __init__(
        self, *args: Any, params: LLMParams, ref_model: Any = None, images: Any = None, **kwargs: Any
    ) -> None:
        kwargs.setdefault("data_collator", list)  # prompts stay PromptRow objects until they are generated from
        super().__init__(*args, **kwargs)
        self.params = params
        self.images = images  # a vision-language run's data/images.ImageCodec: the pixels of the prompts' images
        self.group = params.completions_per_prompt
        self.max_length = completion_length(params)
        self.rewards: list[Reward] = load_rewards(params, self.max_length)
        for reward in self.rewards:
            if isinstance(reward.function, ModelReward):  # loaded now (not at the first step), where the policy runs
                reward.function.load(self.args.device)
        self.beta = self.reference_weight(params)
        # compute_loss scales for accumulation itself (finished_loss; grpo's loss per loss_type), as TRL does.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = True
        unwrapped = self.accelerator.unwrap_model(self.model)
        self.fast_loss = params.fast_loss and fast_loss_supported(unwrapped)
        self.ref_model = None
        if self.beta != 0.0 and ref_model is None and params.model_ref:
            ref_model = load_reference(params, like=unwrapped).to(self.args.device)
        if self.beta != 0.0 and (ref_model is not None or not hasattr(unwrapped, "disable_adapter")):
            if ref_model is None:
                log.info("%s: reference model = a frozen copy of the starting model", params.trainer)
            self.ref_model = (ref_model or copy.deepcopy(unwrapped)).requires_grad_(False).eval()
        start_syncing(self)  # sync_ref_model: the reference moved towards the policy every ref_model_sync_steps
        self.trained_tokens = 0
        # Where a completion ends: the tokenizer's EOS and the model's generation config's (as TRL ends them), and
        # the chat template's turn-end token (models/turns.py: a base model's EOS is often not what ends a turn).
        self.end_ids = turn_end(self.processing_class, unwrapped)[0]
        self.tool_runner = None  # tools: the prompts were rendered with their schemas (data/prompts.py)
        if params.tools:
            self.tool_runner = ToolRunner(load_tools(params.tools), self.processing_class, self.end_ids)
        if params.generation_kwargs:
            self._check_generation_settings(unwrapped)
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._prefix = ""  # "eval_" while evaluating: its figures are logged apart from training's
        self._samples: tuple | None = None  # the step's samples, written with their final advantages
        self.iterations = params.num_iterations
        self.together = params.steps_sampled_together  # steps_per_generation: the steps one sampling serves
        # A sampling's cycle: its steps, num_iterations times over (global_step // cycle); the batches its later
        # steps train on, by their place in it, and the prompts of its later steps, pulled with its own
        self.cycle = self.together * self.iterations
        self._reused: tuple[int, dict[int, tuple[list[dict[str, Any]], float]]] | None = None
        self._ahead: list[list[list[PromptRow]]] = []
        if self.cycle > 1:
            # p_old and p must differ only by what training changed: a dropout mask in one and not the other
            # would move the ratios (and clip them) with no change to the policy (TRL's disable_dropout)
            disable_dropout(self.model)
            log.info(
                "%s: completions trained on after the policy moved (a sampling serves %d steps): dropout off, as "
                "p_old is compared to p",
                params.trainer,
                self.cycle,
            )

    def reference_weight(self, params: LLMParams) -> float:
        """The weight of the comparison with the reference: grpo's and rloo's KL weight, beta (0: no reference
        model, no reference pass); a subclass with a reference loss says its own."""
        return params.beta

    def _get_train_sampler(self, train_dataset=None):  # noqa: D102
        if self.cycle == 1:
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        check_repeatable(len(dataset), self.iterations, self.step_rows(), self.together)
        block = self.step_rows() * self.together
        self.epoch_sampler = RepeatedBlocks(len(dataset), block, self.iterations, self.args.seed)
        return self.epoch_sampler

    # -- rollout: once per sampling (a step's, or steps_per_generation's steps'), for every micro-batch of it
    def get_batch_samples(self, epoch_iterator, num_batches, device):  # noqa: D102
        # the step's prompts: pulled already when an earlier step's sampling took them with its own
        if self._ahead:
            prompts = self._ahead.pop(0)
        else:
            prompts, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        cycle, position = divmod(self.state.global_step, self.cycle)
        part, last = position % self.together, position // self.together == self.iterations - 1
        kept = self._reused[1] if self._reused is not None and self._reused[0] == cycle else {}
        if part in kept:
            return kept.pop(part) if last else kept[part]  # (after its last step, nothing holds a batch)
        steps = [prompts]
        if position == 0:  # the sampling's later steps' prompts (RepeatedBlocks gives them next), sampled now
            while len(steps) < self.together:
                later, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
                if not later:
                    break
                steps.append(later)
            self._ahead = steps[1:]
        else:
            log.info(
                "%s: resumed inside the %d steps one sampling serves: sampling this step afresh",
                self.params.trainer,
                self.cycle,
            )
        rolled = self.roll_out(steps, device)
        kept.update({part + index: found for index, found in enumerate(rolled) if index or not last})
        self._reused = (cycle, kept) if kept else None
        return rolled[0]

    def _inner_training_loop(self, *args: Any, **kwargs: Any) -> Any:
        # Nothing of an earlier attempt's samplings (auto_find_batch_size runs the loop again after an
        # out-of-memory error, from step 0 at a smaller batch size): its prompts, batches and samples.
        self._ahead, self._reused, self._samples = [], None, None
        self.trained_tokens = 0
        return super()._inner_training_loop(*args, **kwargs)

    def roll_out(self, steps: list[list[list[PromptRow]]], device: Any) -> list[tuple[list[dict[str, Any]], float]]:
        """Each step's (micro-batches, completion tokens per process) from one sampling of all their prompts: the
        completions scored, their advantages final over the whole sampling (TRL's generation batch); a later step's
        with their log-probs under the sampling policy (p_old: the policy moves before they are trained). The
        tokens are TRL's: the sampling's (every process's) per process and per step, which dapo's loss divides by."""
        micro_batches = [rows for step in steps for rows in step]
        sampled = self.sample(micro_batches)
        batches = [self._rollout(rows, samples) for rows, samples in zip(micro_batches, sampled, strict=True)]
        self.finish_advantages(batches)
        tokens = torch.tensor(sum(int(b["completion_mask"].sum()) for b in batches), device=device)
        tokens = self.accelerator.gather(tokens).sum().item() / self.accelerator.num_processes / len(steps)
        rolled, start = [], 0
        for index, step in enumerate(steps):
            these = batches[start : start + len(step)]
            start += len(step)
            for batch in these:
                if index:
                    batch["old_logps"] = self.sampling_logps(batch)
                elif self.iterations > 1:
                    batch["first_pass"] = FirstPass()
            rolled.append((these, tokens))
        return rolled

    @torch.no_grad()
    def sampling_logps(self, batch: dict[str, Any]) -> torch.Tensor:
        """The completions' per-token log-probs under the policy as it sampled them (a later step's p_old), scored
        as its training pass scores them (same mode: dropout is off)."""
        return self.completion_logps(self.model, batch)

    @torch.no_grad()
    def _rollout(self, rows: list[PromptRow], samples: Sampled) -> dict[str, Any]:
        """One micro-batch's completions (from `sample`) scored, with their reference log-probs and advantages."""
        tokenizer = self.processing_class
        device = self.args.device
        prompt_ids, prompt_mask, completion_ids = samples.prompt_ids, samples.prompt_mask, samples.completion_ids
        # A completion ends at its first end token (kept: the model learns to stop); one without it was cut.
        ends, truncated = self.completion_ends(completion_ids, samples.last_start)
        positions = torch.arange(completion_ids.size(1), device=device).expand_as(completion_ids)
        completion_mask = (positions <= ends.unsqueeze(1)).long()  # what the model reads
        # What the rewards see, as TRL gives it: the ids through the EOS, the text without special tokens.
        ids_lists = [ids[mask.bool()].tolist() for ids, mask in zip(completion_ids, completion_mask, strict=True)]
        # what is trained on: the model's own tokens (not tool turns), and with mask_truncated_completions none of
        # a completion that was cut
        trained = completion_mask if samples.tool_mask is None else completion_mask * samples.tool_mask
        lengths = trained.sum(1).float()
        if self.params.mask_truncated_completions:
            trained = trained * (~truncated).unsqueeze(1).long()
        repeated = [row for row in rows for _ in range(self.group)]
        if samples.messages is not None:  # with tools: its turns (the rewards' completions, as TRL's)
            completions: list[Any] = samples.messages
            texts = [transcript(messages) for messages in samples.messages]
        else:
            texts = tokenizer.batch_decode(ids_lists, skip_special_tokens=True)
            chat = isinstance(rows[0].prompt, list)
            completions = [[{"role": "assistant", "content": t}] for t in texts] if chat else texts
        names = dict.fromkeys(key for row in rows for key in row.columns)  # a column some rows lack is None there
        columns = {key: [row.columns.get(key) for row in repeated] for key in names}
        where = [row.where for row in repeated]
        # what TRL hands a reward beside the batch: the trainer's state (a curriculum by step), and ways to log a
        # figure of its own (averaged as the others are) or a column beside the samples in completions.jsonl
        extra_columns: dict[str, list[Any]] = {}
        extras = {
            "trainer_state": self.state,
            "log_metric": self.record,
            "log_extra": lambda column, values: extra_columns.__setitem__(
                column, values.tolist() if hasattr(values, "tolist") else list(values)
            ),
        }
        prompts = [r.prompt for r in repeated]
        scores = []
        for reward in self.rewards:
            values = call_reward(reward, prompts, completions, ids_lists, columns, where, extras)
            scores.append([math.nan if v is None else v for v in values])
        per_function = torch.tensor(scores, dtype=torch.float32).T  # (completions, functions)
        weights = torch.tensor([r.weight for r in self.rewards])
        unscorable = torch.isnan(per_function).all(1)
        total = (per_function * weights).nansum(1)
        total[unscorable] = math.nan
        batch = {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "completion_ids": completion_ids,
            "completion_mask": trained,
            "truncated": truncated,  # (cut at max_completion_length: online_dpo's missing_eos_penalty reads it)
        }
        if samples.tool_mask is not None:  # the tool turns are read, not trained on
            batch["completion_attention"] = completion_mask
        batch["input_ids"] = torch.cat([prompt_ids, completion_ids], 1)  # for Trainer's token counting
        if samples.images is not None:  # each row's prompt images, read with its prompt and completion
            shown = self.images.batch_inputs(samples.images, batch["input_ids"].cpu())
            batch["image_inputs"] = {key: value.to(device) for key, value in shown.items()}
        if self.beta != 0.0:
            batch["ref_logps"] = self.reference_logps(batch)
        advantages, std = self.advantages_of(total, batch, per_function)
        batch["advantages"] = advantages.to(device)

        for reward, column in zip(self.rewards, per_function.T, strict=True):
            self.record(f"rewards/{reward.label}/mean", torch.nanmean(column))
            self.record(f"rewards/{reward.label}/std", nanstd(column))
        self.record("reward", torch.nanmean(total))
        self.record("reward_std", nanstd(total))
        if std is not None:  # (else recorded with the step's std, in finish_advantages)
            self.record("frac_reward_zero_std", torch.isclose(std, torch.zeros_like(std)).float().mean())
        self.record("completions/mean_length", lengths.mean())
        self.record("completions/max_length", lengths.max())
        self.record("completions/clipped_ratio", truncated.float().mean())
        if self._samples is None and not self._prefix and self._writes_samples():
            # written once the step's advantages are final (finish_advantages), with them
            self._samples = (repeated, texts, per_function, total, samples.messages, extra_columns)
        return batch

    def finish_advantages(self, batches: list[dict[str, Any]]) -> None:
        """The sampling's advantages made final once every micro-batch of it is rolled out (a method whose
        advantages need the whole sampling's figures, a step's or steps_per_generation's steps', makes them final in
        its override before this), then its samples written with them."""
        if self._samples is not None:
            count = len(self._samples[1])
            self._write_samples(*self._samples, batches[0]["advantages"][:count].cpu())
            self._samples = None

    def advantages_of(
        self, total: torch.Tensor, batch: dict[str, Any], per_function: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(what each completion's loss trains on, its group's reward std or None) from the total rewards (NaN:
        unscored), group after group: grpo's advantages, rloo's, online_dpo's rewards. Where they need the whole
        sampling's figures, the values are kept in the batch and made final in finish_advantages (std None)."""
        raise NotImplementedError

    def step_mean_std(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The nan-aware mean and std (Bessel's) of `values` over every process's step, as TRL's over its gathered
        generation batch: NaN (unscored) left out."""
        scored = values[~torch.isnan(values)].double()
        figures = torch.stack([scored.sum(), (scored**2).sum(), torch.tensor(float(len(scored)), dtype=torch.float64)])
        total, squares, count = self.accelerator.reduce(figures.to(self.args.device), reduction="sum").tolist()
        mean = total / max(count, 1.0)
        std = math.sqrt(max(squares - count * mean**2, 0.0) / (count - 1)) if count > 1 else math.nan
        return torch.tensor(mean), torch.tensor(std)

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.ref_model is not None:
            return self.completion_logps(self.ref_model, batch)
        with self.accelerator.unwrap_model(self.model).disable_adapter():
            return self.completion_logps(self.model, batch)

    # -- the log-probabilities, and what every loss does with its result
    def completion_logps(
        self, model: Any, batch: dict[str, torch.Tensor], entropies: bool | str = False, policy: bool = False
    ) -> Any:
        """log p(token) of each completion token under the sampling temperature (the policy that sampled them,
        as TRL scores it), (completions, completion length); 0 on masked tokens. With `entropies`, a pair: those
        and the entropy of each token's next-token distribution (the same projection; differentiable if "grad").
        `policy`: the trained forward, whose mixture of experts' balancing loss (prompt and completion tokens, as
        TRL's) the loss adds."""
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        attention = torch.cat([batch["prompt_mask"], batch.get("completion_attention", batch["completion_mask"])], 1)
        width = batch["prompt_ids"].size(1)
        labels = torch.full_like(ids, -100)
        labels[:, width:] = torch.where(batch["completion_mask"].bool(), batch["completion_ids"], -100)
        inputs = {
            "input_ids": ids,
            "attention_mask": attention,
            "use_cache": False,
            **batch.get("image_inputs", {}),
            **(self.routing() if policy else {}),
        }
        temperature = self.params.temperature if self.scores_at_temperature else 1.0
        unwrapped = self.accelerator.unwrap_model(model)
        if self.fast_loss_now(unwrapped) and getattr(unwrapped.get_output_embeddings(), "bias", None) is None:
            with output_head_returns_hidden(unwrapped) as head:
                outputs = model(**inputs)
            if policy:
                self.keep_balancing(outputs, attention)
            hidden = outputs.logits / temperature  # W(h / T) = (W h) / T
            if not entropies:
                return token_logprobs(hidden, head, labels)[:, width - 1 :]
            logps, entropy = token_logprobs_and_entropies(hidden, head, labels)
            entropy = entropy if entropies == "grad" else entropy.detach()
        else:
            outputs = model(**inputs)
            if policy:
                self.keep_balancing(outputs, attention)
            logits = outputs.logits.float() / temperature
            if not entropies:
                return logits_token_logprobs(logits, labels)[:, width - 1 :]
            with torch.set_grad_enabled(torch.is_grad_enabled() and entropies == "grad"):
                entropy = logits_entropies(logits, labels)  # (without gradient: chunk by chunk, nothing kept)
            logps = logits_token_logprobs(logits, labels)
        return logps[:, width - 1 :], entropy[:, width - 1 :]

    def old_logps(self, logps: torch.Tensor, inputs: dict[str, Any], training: bool) -> torch.Tensor:
        """The sampling policy's per-token log-probs: the policy's own (ratio 1); a later step's of one sampling,
        scored when sampled (steps_per_generation); or with num_iterations those of the batch's first step
        (FirstPass)."""
        if training and inputs.get("old_logps") is not None:
            return inputs["old_logps"]
        first = inputs.get("first_pass")
        return first.old_logps(logps, training) if first is not None else logps.detach()

    def finished_loss(
        self, loss: torch.Tensor, metrics: dict[str, Any], mask: torch.Tensor, training: bool, scaled: bool = False
    ) -> torch.Tensor:
        """A micro-batch's loss as Trainer takes it (loss_is_scaled_for_ga): a mean over the micro-batch divided by
        the accumulation steps in training (unless `scaled` already), plus a mixture of experts' balancing loss
        scaled alike; its figures recorded and, in training, its completion tokens counted."""
        steps = self.current_gradient_accumulation_steps
        if training:
            loss = loss if scaled else loss / steps
            self.trained_tokens += int(mask.sum())
        for name, value in metrics.items():
            self.record(name, value)
        return self.add_balancing(loss, training, steps)

    def record(self, name: str, value: Any) -> None:
        self._metrics[self._prefix + name].append(float(value.detach() if torch.is_tensor(value) else value))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:  # noqa: D102
        evaluating = any(key.startswith("eval_") for key in logs)
        mine = {n: self._metrics.pop(n) for n in [n for n in self._metrics if n.startswith("eval_") == evaluating]}
        logs.update(self.process_means(mine))
        super().log(logs, start_time)

    # -- checkpoints (sync_ref_model's reference), and samples for the user to read
    def save_extras(self, folder: Path) -> None:  # noqa: D102
        save_synced(self, folder)

    def load_extras(self, folder: Path) -> None:  # noqa: D102
        load_synced(self, folder)

    def _writes_samples(self) -> bool:
        """Whether this rollout's samples are written: every completions_every steps. With num_iterations or
        steps_per_generation a rollout stands for the steps it serves, written when one of them is due: a cycle's
        first serves the whole cycle; one a resumed run makes inside a cycle, its own part's steps left in it (the
        cycle's other parts are sampled afresh too, each for its own steps: none is written twice)."""
        every = self.params.completions_every
        if every <= 0 or not self.is_world_process_zero():
            return False
        step = self.state.global_step
        position = step % self.cycle
        end = step - position + self.cycle
        served = range(step, end) if position == 0 else range(step, end, self.together)
        return any(served_step % every == 0 for served_step in served)

    def _write_samples(self, rows, texts, per_function, total, messages, extra_columns, advantages) -> None:
        """A few prompts of this step (the first group's completions of up to 2 prompts), appended to the run's
        completions.jsonl: what the model writes (with tools, its turns too), and what each reward made of it."""
        path = Path(self.args.output_dir) / COMPLETIONS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as out:
            for i in range(min(len(texts), 2 * self.group)):
                record = {
                    "step": self.state.global_step + 1,
                    "prompt": rows[i].prompt,
                    "completion": texts[i],
                    "rewards": {r.label: _finite(float(per_function[i, j])) for j, r in enumerate(self.rewards)},
                    "reward": _finite(float(total[i])),
                    "advantage": _finite(float(advantages[i])),  # (online_dpo: an unscored reward, NaN)
                    "where": rows[i].where,
                }
                if messages is not None:
                    record["messages"] = messages[i]
                if extra_columns:  # (what the rewards logged with log_extra, TRL's)
                    record["extra"] = {
                        column: values[i] for column, values in extra_columns.items() if i < len(values)
                    }
                out.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):  # noqa: D102
        """Evaluation: completions for the validation prompts (num_generations_eval each), scored; the loss and
        rewards go under eval_."""
        self._prefix = "eval_"
        group, self.group = self.group, self.params.num_generations_eval or self.group
        try:
            batch = self._rollout(inputs, self.sample([inputs])[0])
            self.finish_advantages([batch])
            with torch.no_grad():
                loss = self.compute_loss(model, batch)
        finally:
            self._prefix, self.group = "", group
        return loss.detach(), None, None


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 4)
