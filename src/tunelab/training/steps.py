"""How many optimizer steps a run takes: one rule for the trainer and the dry run (no torch, no transformers)."""

from __future__ import annotations

import math

from tunelab.config.base import RunParams


def epoch_steps(rows: int, params: RunParams, processes: int = 1) -> int:
    """Optimizer steps in an epoch of `rows`, as transformers' Trainer counts them. With num_iterations (grpo,
    rloo: methods/grpo.RepeatedBlocks) each step's prompts come round that many times, and a last block short of a
    step is left out."""
    block = params.batch_size * params.gradient_accumulation * processes
    repeats = getattr(params, "num_iterations", 1)
    if repeats > 1:
        return max(1, rows // block) * repeats
    return max(1, math.ceil(rows / block))
