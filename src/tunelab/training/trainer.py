"""The training loop: transformers' Trainer with tunelab's own batches and loss.

transformers' Trainer brings the optimizer, scheduler, gradient accumulation, evaluation, checkpoints, resume,
mixed precision and accelerate (DDP/FSDP/DeepSpeed). tunelab replaces the two parts that decide speed and
memory: the batches (padding-free, data/packing.py) and the loss (from hidden states in chunks,
speed/loss.py), so full-vocabulary logits are never materialised. `build_trainer` makes the Trainer of an LLM
run (a method's own Trainer class for the pair losses, methods/); `training_arguments` and `run_training` serve
every task.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler

from tunelab.config.base import RunParams
from tunelab.config.llm import LLMParams
from tunelab.data.packing import PackedRowsCollator, row_lengths
from tunelab.env import distributed_kind
from tunelab.errors import TunelabError
from tunelab.models import ROUTER_AUX
from tunelab.models.checks import CLASSIFIER_HEADS
from tunelab.models.peft import quiet_peft_save
from tunelab.speed import compile_layers, optimizer_name, pad_multiple
from tunelab.speed.lora_dropout import DropoutLoraA
from tunelab.speed.loss import (
    causal_lm_loss_sum,
    fast_loss_supported,
    head_sharded_outside_forward,
    output_head_returns_hidden,
)
from tunelab.training import checkpoints
from tunelab.training.steps import epoch_steps

log = logging.getLogger("tunelab")


class ListDataset(torch.utils.data.Dataset):
    """The rows of a run: a list, or a view onto the prepared token tables (data/rows.py)."""

    def __init__(self, rows: Any) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Any:
        return self.rows[index]


class EpochSeededLengthSampler(LengthGroupedSampler):
    """Length-grouped batches in an order that depends only on (seed, epoch): a run resumed in epoch 3 sees the
    same order as one that never stopped (Trainer calls set_epoch at the start of every epoch)."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int) -> None:
        super().__init__(batch_size, lengths=lengths, generator=torch.Generator().manual_seed(seed))
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed + epoch)


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off for good (LoRA's too): for losses that compare log-probs of two answers, two models or two passes
    (the preference methods; grpo with num_iterations), which dropout would make noisy."""
    for module in model.modules():
        if isinstance(module, (torch.nn.Dropout, DropoutLoraA)):
            module.p = 0.0


class TrainingStopped(TunelabError):
    """Training stopped on purpose (a non-finite loss, no disk space); the last good checkpoint is kept."""


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """`model` in eval mode (no dropout) for a pass that samples or scores, then in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class GuardedTrainer(Trainer):
    """transformers' Trainer made safe with the user's time, the base of every tunelab Trainer.

    - A NaN or inf loss stops the run before the optimizer step would spread it into the weights, naming the step.
    - Checkpoints are marked complete only once every process has written its part and all of it is on disk, and
      older ones pruned only then (checkpoints.py); the limit of kept checkpoints (`keep_checkpoints`, from
      save_total_limit) is applied here, not by Trainer, whose rotation could delete the last complete checkpoint
      before the new one is marked.
    - A resumed run's final figures (train_loss, train_runtime, samples and steps per second, trained tokens, the
      evaluations' reports in `evaluation_reports`) are the whole run's: each checkpoint keeps the totals so far
      (checkpoints.Progress), which Trainer, counting from the resume, does not.
    - Free disk space is checked before each checkpoint is written.
    - With `group_by_length`, batches hold rows of similar length (data/packing.row_length: an example's, a packed
      row's or a preference pair's len()), in an order that depends only on the seed and the epoch (so a resumed
      run sees the same batches).
    - With `head_lr_ratio`, the parameters of a new classification head (`head_parameter`) learn at lr x ratio.
    """

    def __init__(
        self,
        *args: Any,
        keep_checkpoints: int = 1,
        group_by_length: bool = False,
        loraplus_lr_ratio: float | None = None,
        head_lr_ratio: float = 1.0,
        evaluation_reports: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.keep_checkpoints = keep_checkpoints
        self.group_by_length = group_by_length
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.head_lr_ratio = head_lr_ratio
        # The task's list of reports, one appended per evaluation (by its compute_metrics): kept with each
        # checkpoint, so that a resumed run's list holds the evaluations from before the resume too.
        self.evaluation_reports = evaluation_reports
        self.resumed_from: int | None = None  # the step this process resumed the run from
        self.earlier: checkpoints.Progress | None = None  # the totals of the run up to there
        self._summary: dict[str, float] = {}  # Trainer's end-of-training figures, made the whole run's
        self._part = _ThisPart()
        self.add_callback(self._part)
        self._aux_losses: dict[str, list[torch.Tensor]] = {}  # a mixture of experts' balancing loss, until logged

    def fast_loss_now(self, unwrapped: Any) -> bool:
        """`self.fast_loss`, turned off for good (said once) when DeepSpeed ZeRO-3 has sharded the output head since
        __init__ (Trainer shards the model when training starts): the chunked loss cannot read its weights."""
        if getattr(self, "fast_loss", False) and head_sharded_outside_forward(unwrapped):
            log.info("fast_loss: off, DeepSpeed ZeRO-3 shards the output head; the loss is computed from full logits")
            self.fast_loss = False
        return getattr(self, "fast_loss", False)

    def create_optimizer(self, model=None):  # noqa: D102
        if self.optimizer is not None:
            return self.optimizer
        if self.loraplus_lr_ratio is None:
            super().create_optimizer(model)
        else:
            self._create_loraplus_optimizer()
        if self.head_lr_ratio != 1.0:
            self._move_head_to_own_groups()
        return self.optimizer

    def _move_head_to_own_groups(self) -> None:
        """The head's parameters out of each optimizer group into a copy of that group at lr x head_lr_ratio (the
        scheduler, created after, scales every group's own lr)."""
        head = {id(p) for name, p in self.model.named_parameters() if p.requires_grad and head_parameter(name)}
        groups = []
        for group in self.optimizer.param_groups:
            moved = [p for p in group["params"] if id(p) in head]
            kept = [p for p in group["params"] if id(p) not in head]
            if kept:
                groups.append({**group, "params": kept})
            if moved:
                groups.append({**group, "params": moved, "lr": group["lr"] * self.head_lr_ratio})
        self.optimizer.param_groups.clear()
        for group in groups:
            self.optimizer.add_param_group(group)

    def _create_loraplus_optimizer(self) -> None:
        # LoRA+ (PEFT's optimizer groups): the B matrices at lr x ratio, the rest at lr, the optimizer the run names.
        from peft.optimizers import create_loraplus_optimizer

        optimizer_class, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
        lr = kwargs.pop("lr", self.args.learning_rate)
        self.optimizer = create_loraplus_optimizer(
            self.model,
            optimizer_class,
            lr=lr,
            loraplus_lr_ratio=self.loraplus_lr_ratio,
            loraplus_weight_decay=self.args.weight_decay,
            **kwargs,
        )

    def _get_train_sampler(self, train_dataset=None):  # noqa: D102
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.group_by_length:
            return super()._get_train_sampler(train_dataset)
        # Batches of similar lengths: little padding without packing, and still a random order of batches.
        lengths = row_lengths(dataset.rows)
        # Grouped by the global batch (all processes): the same order whatever the number of processes, each
        # process then taking its share of every batch.
        self.epoch_sampler = EpochSeededLengthSampler(self.step_rows(), lengths=lengths, seed=self.args.seed)
        return self.epoch_sampler

    def step_rows(self) -> int:
        """Rows in one optimizer step, all processes together, at the batch size the dataloader is built with
        (auto_find_batch_size lowers it after an out-of-memory error; the arguments keep the first)."""
        return self._train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size

    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        # A resumed run's dataloader is wrapped once more (accelerate's skip_first_batches) and, with several
        # processes, transformers' own set_epoch no longer reaches the sampler: set it here, so the resumed epoch
        # has the order the uninterrupted one had.
        sampler = getattr(self, "epoch_sampler", None)
        if sampler is not None and "epoch" in kwargs:
            sampler.set_epoch(kwargs["epoch"])
        return super()._run_epoch(*args, **kwargs)

    def trained_tokens_all_processes(self) -> int:
        """Answer tokens trained on, summed over every process, in the whole run (the part before a resume too)."""
        count = torch.tensor(getattr(self, "trained_tokens", 0), device=self.args.device)
        earlier = self.earlier.trained_tokens if self.earlier else 0
        return earlier + int(self.accelerator.reduce(count, reduction="sum"))

    def training_step(self, model, inputs, num_items_in_batch=None):  # noqa: D102
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Trainer itself reads this flag right after (its NaN filter), so checking it costs no extra sync.
        if not torch.isfinite(loss):
            raise TrainingStopped(
                f"the loss became {float(loss)} at step {self.state.global_step + 1}; training stopped before the "
                "weights were updated with it. Likely causes: a learning rate too high (lower lr, or raise "
                "warmup_ratio), fp16 overflow (use bf16 or no mixed precision), or max_grad_norm 0 (clipping off)"
            )
        self._part.add(loss)  # what Trainer adds up for its logged loss, kept for the checkpoints' totals
        return loss

    def train(self, resume_from_checkpoint: str | None = None, **kwargs: Any) -> Any:  # noqa: D102
        self.resumed_from = self.earlier = None
        if resume_from_checkpoint and not isinstance(resume_from_checkpoint, bool):  # (True: Trainer finds one)
            checkpoint = Path(resume_from_checkpoint)
            self.resumed_from = checkpoints.step_of(checkpoint)
            self.earlier = checkpoints.read_progress(checkpoint)
            if self.earlier is not None and self.evaluation_reports is not None:
                self.evaluation_reports[:] = self.earlier.evaluations
            self.load_extras(checkpoint)
        result = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        if self.resumed_from is None:
            return result
        metrics = {**result.metrics, **self._summary}
        return result._replace(training_loss=metrics.get("train_loss", result.training_loss), metrics=metrics)

    def router_aux(self) -> Any:
        """The model's load-balancing loss as the run adds it (models.Balancing), None for none."""
        return getattr(self.accelerator.unwrap_model(self.model), ROUTER_AUX, None)

    def routing(self) -> dict[str, bool]:
        """The forward's keyword that asks a mixture of experts for its router logits, when the run adds its
        balancing loss (models.route_experts); none otherwise. Only the trained policy's forward takes it."""
        return {"output_router_logits": True} if self.router_aux() else {}

    def keep_balancing(self, outputs: Any, token_mask: Any) -> None:
        """Keep the balancing loss of the routed forward that gave `outputs`, over `token_mask`'s tokens, until
        the method's compute_loss adds it (add_balancing)."""
        if self.router_aux():
            self._aux_loss = self.balancing(getattr(outputs, "router_logits", None), token_mask)

    def add_balancing(self, loss: torch.Tensor, training: bool, accumulation: int = 1) -> torch.Tensor:
        """`loss` plus the kept balancing loss of a mixture of experts (weight x aux / `accumulation`: the steps a
        method's loss is already divided by; TRL's way, a mean over the micro-batch that DDP averages over
        processes); recorded for the log either way. Training's only: eval_loss stays the method's own loss
        (the cross-entropy a perplexity is read from), the balancing loss is logged beside it as eval_aux_loss."""
        aux = self.__dict__.pop("_aux_loss", None)
        if aux is None:
            return loss
        self._aux_losses.setdefault("aux_loss" if training else "eval_aux_loss", []).append(aux.detach())
        return loss + self.router_aux().weight * aux.to(loss.device) / accumulation if training else loss

    def balancing(self, router_logits: Any, token_mask: Any) -> torch.Tensor | None:
        """The model's own load-balancing loss over the micro-batch's real tokens (`token_mask`: the collator's;
        padding routes too, and would count); None where the model gave no router logits."""
        found = self.router_aux()
        if not router_logits:
            return None
        value = found.function(router_logits, found.experts, found.top_k, token_mask)
        return value if torch.is_tensor(value) else None

    def process_means(self, metrics: dict[str, list[float]]) -> dict[str, float]:
        """Each figure a method recorded since the last log, its mean over every process's values (each process
        records its own micro-batches'; TRL gathers them too), NaN values left out. Called by every process, as
        Trainer.log is: the names are gathered first, so a figure one process lacks counts the others' only."""
        figures = {}
        for name, values in metrics.items():
            finite = [v for v in values if not math.isnan(v)]
            figures[name] = (math.fsum(finite), len(finite))
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            names = sorted(set().union(*gather_object([tuple(figures)])))
            local = torch.tensor([figures.get(name, (0.0, 0)) for name in names], dtype=torch.float64)
            totals = self.accelerator.reduce(local.to(self.args.device), reduction="sum").tolist()
            figures = dict(zip(names, totals, strict=True))
        return {name: round(total / count, 6) for name, (total, count) in figures.items() if count}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:  # noqa: D102
        evaluating = any(key.startswith("eval_") for key in logs)
        name = "eval_aux_loss" if evaluating else "aux_loss"
        if self.router_aux() and "train_loss" not in logs:  # (every process has them: a collective)
            values = [float(value) for value in self._aux_losses.pop(name, [])]
            logs.update(self.process_means({name: values}))
        if "train_loss" in logs and self.resumed_from is not None:  # Trainer's summary at the end of training
            self._whole_run(logs)
        super().log(logs, start_time)

    def _whole_run(self, logs: dict[str, float]) -> None:
        """Trainer's end-of-training figures, of the part since the resume, made the whole run's (in place)."""
        logs["resumed_from_step"] = self.resumed_from
        earlier = self.earlier
        if earlier is not None:  # else a checkpoint of an older tunelab, which kept no totals: the part's figures
            steps, part_steps = self.state.global_step, self.state.global_step - earlier.step
            part_runtime = logs.get("train_runtime", 0.0)
            runtime = earlier.train_runtime + part_runtime
            # Trainer's train_loss is the part's summed loss over the part's steps
            logs["train_loss"] = (earlier.loss_sum + logs["train_loss"] * part_steps) / max(steps, 1)
            if "train_samples_per_second" in logs:  # each step takes the same number of samples
                if part_steps:
                    samples_per_step = logs["train_samples_per_second"] * part_runtime / part_steps
                else:  # resumed from its last step (a crash while the run was saved): no step here to count by
                    args = self.args
                    samples_per_step = args.train_batch_size * args.gradient_accumulation_steps * args.world_size
                logs["train_samples_per_second"] = round(samples_per_step * steps / max(runtime, 1e-9), 3)
            logs["train_steps_per_second"] = round(steps / max(runtime, 1e-9), 3)
            logs["train_runtime"] = round(runtime, 4)
        self._summary = dict(logs)

    def _progress(self) -> checkpoints.Progress | None:
        """The run's totals at this step, for its checkpoint; every process takes part (the loss and tokens are
        summed over them). None when a run resumed from an older tunelab's checkpoint, whose totals are unknown."""
        if self.resumed_from is not None and self.earlier is None:
            return None
        earlier = self.earlier or checkpoints.Progress()
        loss = self._part.loss if self._part.loss is not None else torch.zeros((), device=self.args.device)
        loss = float(self.accelerator.reduce(loss.detach().float().reshape(1), reduction="mean"))
        return checkpoints.Progress(
            step=self.state.global_step,
            train_runtime=round(earlier.train_runtime + time.time() - self._part.started, 4),
            loss_sum=earlier.loss_sum + loss,
            trained_tokens=self.trained_tokens_all_processes(),
            evaluations=list(self.evaluation_reports or []),
        )

    def save_extras(self, folder: Path) -> None:
        """What a method keeps in a checkpoint beside the model, optimizer and random state (dpo's synced
        reference): written before the checkpoint is marked complete."""

    def load_extras(self, folder: Path) -> None:
        """Read back what save_extras wrote, when a run resumes from `folder`."""

    def _save_checkpoint(self, model, trial):  # noqa: D102
        run_dir = Path(self._get_output_dir(trial=trial))
        name = f"checkpoint-{self.state.global_step}"
        if self.args.should_save:
            unwrapped = self.accelerator.unwrap_model(self.model)
            full = not hasattr(unwrapped, "peft_config")
            copies = 2 if getattr(getattr(self, "params", None), "sync_ref_model", False) else 1  # + the reference
            checkpoints.check_disk_space(run_dir, checkpoints.checkpoint_bytes(unwrapped, full, copies), name)
        with quiet_peft_save():
            super()._save_checkpoint(model, trial)
        progress = self._progress()
        # Every process writes its own part of the checkpoint (its random state; under FSDP or DeepSpeed its shards
        # of the weights and optimizer): all of them must have finished before the mark says it is complete.
        if self.args.should_save:
            self.save_extras(run_dir / name)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            if progress is not None:
                checkpoints.write_progress(run_dir / name, progress)
            checkpoints.mark_complete(run_dir / name, self.args.world_size)
            checkpoints.prune(run_dir, self.keep_checkpoints, protect=self.state.best_model_checkpoint)


class _ThisPart(TrainerCallback):
    """This process's part of the run: when Trainer's clock started (at on_train_begin, which it measures
    train_runtime from) and the sum of its steps' losses since (on the device: adding syncs nothing)."""

    def __init__(self) -> None:
        self.started = time.time()
        self.loss: torch.Tensor | None = None

    def add(self, loss: torch.Tensor) -> None:
        loss = loss.detach()
        self.loss = loss if self.loss is None else self.loss + loss

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: D102
        self.started = time.time()
        self.loss = None  # also when Trainer starts over (auto_find_batch_size after running out of memory)


def head_parameter(name: str) -> bool:
    """A parameter of a sequence classifier's new head (models/checks.CLASSIFIER_HEADS), also as PEFT's trained copy
    (`...score.modules_to_save.default.weight`)."""
    return any(part in CLASSIFIER_HEADS for part in name.split(".")[:-1])


class TunelabTrainer(GuardedTrainer):
    """Trainer whose loss is the summed next-token cross-entropy over trained tokens, normalised by the number of
    trained tokens in the whole (accumulated, all-device) batch."""

    def __init__(self, *args: Any, fast_loss: bool = True, params: LLMParams | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params = params  # a method's own subclass reads its settings here (methods/distill.py)
        # Tell Trainer that compute_loss already divides by the tokens of the whole accumulated batch, so it
        # neither divides again by the accumulation steps nor counts differently.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self.fast_loss = fast_loss and fast_loss_supported(self.accelerator.unwrap_model(self.model))
        self.trained_tokens = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: D102
        labels = inputs.pop("labels")
        loss_sum, count = self.loss_sum(model, inputs, labels)
        if model.training:
            self.trained_tokens += count
        denominator = num_items_in_batch if num_items_in_batch is not None else max(count, 1)
        if torch.is_tensor(denominator):
            denominator = denominator.to(loss_sum.device)
        loss = loss_sum / denominator
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        # (Trainer divides the loss by the accumulation steps itself only without num_items_in_batch)
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        loss = self.add_balancing(loss, model.training, steps)
        return (loss, {}) if return_outputs else loss

    def loss_sum(self, model: Any, inputs: dict[str, Any], labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The loss summed over the trained tokens of the micro-batch, and their count: here the next-token
        cross-entropy (a method's subclass sums its own)."""
        unwrapped = self.accelerator.unwrap_model(model)
        token_mask = inputs.pop("token_mask", None)  # (the collator marks real tokens for the balancing loss)
        if self.fast_loss_now(unwrapped):
            with output_head_returns_hidden(unwrapped) as head:
                outputs = model(**inputs, use_cache=False, **self.routing())
            self.keep_balancing(outputs, token_mask)
            return causal_lm_loss_sum(outputs.logits, head, labels)
        outputs = model(**inputs, use_cache=False, **self.routing())
        self.keep_balancing(outputs, token_mask)
        logits = outputs.logits.float()
        shift_labels = labels[:, 1:]
        count = int((shift_labels != -100).sum())
        loss_sum = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), shift_labels.reshape(-1), reduction="sum"
        )
        return loss_sum, count


def _checkpointing(enabled: bool, every: int = 1) -> dict[str, Any]:
    """Gradient checkpointing switches under their current name (transformers 5.23 renamed them and added
    `every_n_layers`, which checkpoints only some layers)."""
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    prefix = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if every > 1:
        kwargs["every_n_layers"] = every
    return {prefix: enabled, f"{prefix}_kwargs": kwargs}


def log_every(params: RunParams, steps_per_epoch: int) -> int:
    """Steps between two logs (and evaluations with eval_strategy steps): as asked, else about 25 per run."""
    if params.logging_steps > 0:
        return params.logging_steps
    total_steps = params.max_steps if params.max_steps > 0 else steps_per_epoch * params.epochs
    return max(1, min(25, math.ceil(total_steps / 25)))


def training_arguments(
    params: RunParams, output_dir: str, steps_per_epoch: int, has_valid: bool, **overrides: Any
) -> TrainingArguments:
    """Map a parameter object onto transformers' TrainingArguments (AutoTrain's names on the left); `overrides`
    are TrainingArguments fields a task sets its own way."""
    total_steps = params.max_steps if params.max_steps > 0 else steps_per_epoch * params.epochs
    logging_steps = log_every(params, steps_per_epoch)
    eval_strategy = params.eval_strategy if has_valid else "no"
    report_to = [] if params.log == "none" else [params.log]
    settings: dict[str, Any] = dict(
        output_dir=output_dir,
        learning_rate=params.lr,
        num_train_epochs=params.epochs,
        max_steps=params.max_steps,
        per_device_train_batch_size=params.batch_size,
        per_device_eval_batch_size=params.batch_size,
        gradient_accumulation_steps=params.gradient_accumulation,
        auto_find_batch_size=params.auto_find_batch_size,
        warmup_steps=params.warmup_ratio,  # transformers 5: a value below 1 is a ratio of the total steps
        optim=optimizer_name(params),
        lr_scheduler_type=params.scheduler,
        weight_decay=params.weight_decay,
        max_grad_norm=params.max_grad_norm,
        seed=params.seed,
        data_seed=params.seed,
        bf16=params.mixed_precision == "bf16",
        fp16=params.mixed_precision == "fp16",
        # Under FSDP, activation checkpointing is FSDP's own (its config); transformers refuses both at once.
        **_checkpointing(
            not params.disable_gradient_checkpointing and distributed_kind() != "fsdp",
            params.checkpoint_every,
        ),
        use_cpu=not torch.cuda.is_available(),  # several CPU processes then talk over gloo
        # The fast loss uses the output head's weight outside the model's forward: DDP's search for unused
        # parameters would mark it ready once after the forward and again in the backward, and fail.
        ddp_find_unused_parameters=False,
        logging_steps=logging_steps,
        logging_first_step=True,
        eval_strategy=eval_strategy,
        eval_steps=logging_steps if eval_strategy == "steps" else None,
        save_strategy="steps",
        save_steps=params.save_steps if params.save_steps > 0 else max(1, min(500, total_steps // 2 or 1)),
        save_total_limit=None,  # GuardedTrainer keeps params.save_total_limit complete checkpoints itself
        report_to=report_to,
        remove_unused_columns=False,
        label_names=["labels"],
        prediction_loss_only=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=True,  # tunelab's own progress bar (callbacks.py) shows loss and ETA
        save_only_model=False,
        # transformers' NEFTune: a hook on the input embeddings adds the noise in training mode only
        neftune_noise_alpha=getattr(params, "neftune_noise_alpha", None),
    )
    return TrainingArguments(**{**settings, **overrides})


def early_stopping_arguments(params: RunParams, steps_per_epoch: int) -> dict[str, Any]:
    """The TrainingArguments early stopping needs: a checkpoint at every evaluation (the best one is kept and
    loaded at the end), ranked by the eval loss, and the patience counted on across a resume."""
    return {
        "save_strategy": params.eval_strategy,
        **({"save_steps": log_every(params, steps_per_epoch)} if params.eval_strategy == "steps" else {}),
        "load_best_model_at_end": True,
        "metric_for_best_model": "eval_loss",
        "greater_is_better": False,
        "restore_callback_states_from_checkpoint": True,
    }


def build_trainer(
    model: Any,
    tokenizer: Any,
    params: LLMParams,
    train_rows: list[Any],
    valid_rows: list[Any] | None,
    output_dir: str,
    callbacks: list[Any] | None = None,
    trainer_class: type | None = None,
    images: Any = None,
) -> Trainer:
    """The Trainer for one run: tunelab's collator, sampler and loss around transformers' loop.

    `trainer_class` is the method's own Trainer (preference methods: pairs in, their loss out); None means the
    next-token loss of TunelabTrainer. `images`: a vision-language run's data/images.ImageCodec (the collator adds
    each batch's pixels).
    """
    from transformers.trainer_callback import PrinterCallback

    # Streamed rows (data/streaming.py) are an IterableDataset: no count before training (max_steps is required),
    # and no sampler (they are trained in file order).
    streamed = isinstance(train_rows, torch.utils.data.IterableDataset)
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # accelerate launch sets it in every process
    steps_per_epoch = params.max_steps if streamed else epoch_steps(len(train_rows), params, processes)
    has_valid = _dataset(valid_rows) is not None
    early = params.early_stopping_patience is not None and has_valid and params.eval_strategy != "no"
    overrides = early_stopping_arguments(params, steps_per_epoch) if early else {}
    if streamed and images is not None:
        # accelerate hands an iterable dataset's batches out from one process, cut along their first dimension to
        # each process's rows: a batch's pixels (one row per image patch) would be cut to the batch size. Each
        # process reads the rows itself instead, and takes its share of them before they are collated.
        overrides["accelerator_config"] = {"dispatch_batches": False}
    args = training_arguments(params, output_dir, steps_per_epoch, has_valid, **overrides)
    if params.torch_compile:
        log.info("torch_compile: compiled %d decoder layers", compile_layers(model))
    common = {
        "keep_checkpoints": params.save_total_limit,
        "loraplus_lr_ratio": params.loraplus_lr_ratio if params.peft else None,
        "model": model,
        "args": args,
        "train_dataset": train_rows if streamed else ListDataset(train_rows),
        "eval_dataset": _dataset(valid_rows),
        "processing_class": tokenizer,
        "callbacks": callbacks,
    }
    if trainer_class is not None and not issubclass(trainer_class, TunelabTrainer):
        shown = {"images": images} if images is not None else {}  # a vision-language run's pairs
        trainer = trainer_class(params=params, **common, **shown)  # pairs or prompts: brings its own collator
    else:  # rows of examples: the next-token loss, or a method's own loss over the same rows (distill)
        # Flash-attention kernels take one flat sequence with per-example positions (no padding at all); SDPA and
        # eager attention get one row per packed row, so attention stays quadratic in the row, not the batch.
        # (Not with images: Qwen2-VL's 3-D rotary positions are computed from the rows as they are, never given.)
        flat = str(getattr(model.config, "_attn_implementation", "")).startswith("flash_attention") and not images
        trainer = (trainer_class or TunelabTrainer)(
            fast_loss=params.fast_loss,
            params=params,
            data_collator=PackedRowsCollator(
                tokenizer.pad_token_id,
                flat=flat,
                pad_to_multiple_of=pad_multiple(),
                mark_tokens=bool(getattr(model, ROUTER_AUX, None)),  # for a mixture of experts' balancing loss
                images=images,
            ),
            group_by_length=params.group_by_length and not params.packing and not streamed,
            **common,
        )
    trainer.remove_callback(PrinterCallback)  # tunelab's own callback prints progress
    if early:
        from transformers import EarlyStoppingCallback

        trainer.add_callback(EarlyStoppingCallback(params.early_stopping_patience, params.early_stopping_threshold))
    return trainer


def _dataset(rows: Any) -> Any:
    if rows is None or isinstance(rows, torch.utils.data.IterableDataset):
        return rows
    return ListDataset(rows) if len(rows) else None


def run_training(trainer: Trainer, folder: Any, resume_from: Path | None) -> Any:
    """`trainer.train()`, resumed from a checkpoint when there is one; a failure says what it left behind."""
    if resume_from is not None:
        log.info(
            "resuming from %s (step %d): same data order, optimizer, scheduler and random state",
            resume_from,
            checkpoints.step_of(resume_from),
        )
    try:
        return trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except TunelabError as err:
        raise type(err)(f"{err}. {folder.left_behind()}") from None
    except torch.OutOfMemoryError:
        # grpo and rloo sample a whole step (or steps_per_generation's) at once: accumulation does not lower that
        # part's memory
        sampling = ""
        if getattr(trainer, "samples_whole_steps", False):
            sampling = "lower prompts_per_generation (the prompts sampled for at once: the sampling's by default), "
        raise TrainingStopped(
            f"out of memory while training: {sampling}lower batch_size (and raise gradient_accumulation to keep the "
            "effective batch), lower block_size, keep gradient checkpointing on, or train a LoRA adapter (--peft, "
            "with --quantization int4 on CUDA); `tunelab llm --dry-run` estimates the memory a setting needs. "
            f"{folder.left_behind()}"
        ) from None
    except BaseException:
        log.error("training failed. %s", folder.left_behind())
        raise
