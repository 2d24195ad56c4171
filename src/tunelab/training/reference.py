"""A reference model that moves towards the policy while training (`sync_ref_model`, TR-DPO's soft update, as TRL
has it for DPO, GRPO and RLOO): every `ref_model_sync_steps` optimizer steps each reference weight becomes
alpha x the policy's + (1 - alpha) x its own. The reference so moved is part of the run's state: it is kept in each
checkpoint, so a resumed run goes on with it, not with the starting one."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from tunelab.env import distributed_kind
from tunelab.errors import TunelabError

log = logging.getLogger("tunelab")

# The checkpoint file of the moved reference (not the base's any more)
SYNCED_REFERENCE = "synced_reference.safetensors"


class SyncReference(TrainerCallback):
    """After every `every` optimizer steps: reference = alpha x policy + (1 - alpha) x reference (alpha 1: a copy of
    the policy), in float32 whatever the reference's precision (a half model_ref would lose small moves)."""

    def __init__(self, trainer: Any, alpha: float, every: int) -> None:
        self.trainer, self.alpha, self.every = trainer, alpha, every
        policy = trainer.accelerator.unwrap_model(trainer.model)
        mine = [(name, tuple(p.shape)) for name, p in policy.named_parameters()]
        theirs = [(name, tuple(p.shape)) for name, p in trainer.ref_model.named_parameters()]
        if mine != theirs:
            raise TunelabError(
                "sync_ref_model mixes the model's weights into the reference's, but model_ref "
                f"{trainer.params.model_ref} has other weights (names or shapes): leave model_ref out, or "
                "sync_ref_model"
            )

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:  # noqa: D102
        if 0 < state.max_steps < self.every:
            log.warning(
                "sync_ref_model: the run has %d steps, fewer than ref_model_sync_steps (%d): the reference stays",
                state.max_steps,
                self.every,
            )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:  # noqa: D102
        if state.global_step % self.every:
            return
        policy = self.trainer.accelerator.unwrap_model(self.trainer.model)
        with torch.no_grad():
            for ref, param in zip(self.trainer.ref_model.parameters(), policy.parameters(), strict=True):
                mixed = ref.float().mul_(1 - self.alpha).add_(param.detach().float().to(ref.device), alpha=self.alpha)
                ref.copy_(mixed)


def start_syncing(trainer: Any) -> None:
    """Adds the soft update to `trainer` (its `ref_model`, its `params`) when the run asks for it."""
    params = trainer.params
    if not getattr(params, "sync_ref_model", False):
        return
    if distributed_kind():  # an accelerate config or launcher of the user's own: not in the settings
        raise TunelabError(
            f"sync_ref_model under {distributed_kind()}: the model's weights are sharded, and the reference's whole "
            "copy cannot be mixed with them; use ddp"
        )
    trainer.add_callback(SyncReference(trainer, params.ref_model_mixup_alpha, params.ref_model_sync_steps))


def save_synced(trainer: Any, folder: Path) -> None:
    """The moved reference into the checkpoint `folder` (GuardedTrainer.save_extras)."""
    if getattr(trainer.params, "sync_ref_model", False) and trainer.ref_model is not None:
        from safetensors.torch import save_model

        save_model(trainer.ref_model, str(folder / SYNCED_REFERENCE))  # (tied weights stored once)


def load_synced(trainer: Any, folder: Path) -> None:
    """The moved reference read back from the checkpoint `folder` a run resumes from (GuardedTrainer.load_extras)."""
    path = folder / SYNCED_REFERENCE
    if getattr(trainer.params, "sync_ref_model", False) and trainer.ref_model is not None:
        from safetensors.torch import load_model

        if not path.is_file():
            raise TunelabError(f"{folder} has no {SYNCED_REFERENCE}: the reference this sync_ref_model run had moved")
        load_model(trainer.ref_model, str(path), device="cpu")  # (copied into the reference's own tensors)
        log.info("%s: the synced reference (sync_ref_model) read back from %s", trainer.params.trainer, path)
