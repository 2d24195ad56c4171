"""How many optimizer steps a run takes: one rule for the trainer and the dry run (no torch, no transformers)."""

from __future__ import annotations

import math

from tunelab.config.base import RunParams


def epoch_steps(rows: int, params: RunParams, processes: int = 1) -> int:
    """Optimizer steps in an epoch of `rows`, as transformers' Trainer counts them. With num_iterations or
    steps_per_generation (grpo, rloo: methods/sampling.RepeatedBlocks) the prompts come in blocks of one sampling's
    (its steps'), each block round num_iterations times, and a last block short of a sampling is left out."""
    block = params.batch_size * params.gradient_accumulation * processes
    repeats = getattr(params, "num_iterations", 1)
    together = getattr(params, "steps_sampled_together", 1)
    if repeats > 1 or together > 1:
        return max(1, rows // (block * together)) * together * repeats
    return max(1, math.ceil(rows / block))
