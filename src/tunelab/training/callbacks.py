"""What a run shows and records while it trains: a progress bar with loss and ETA, and metrics.jsonl.

Each metrics.jsonl record has what the trainer logged (loss, learning_rate, grad_norm, the method's own metrics)
plus the time since the start, the throughput since the last record (`trained_tokens_per_second`: tokens the loss
was computed on, all processes, where the trainer counts them: default and sft) and the process's peak memory so
far (`peak_memory_gib`: accelerator memory on a GPU, resident memory on a CPU), which the web app draws.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import TrainerCallback


class ProgressAndMetrics(TrainerCallback):
    """One progress bar (loss, learning rate, ETA) and one JSON line per log event in `metrics_path`."""

    def __init__(self, metrics_path: Path, show_bar: bool | None = None, perplexity: bool = True) -> None:
        self.metrics_path = metrics_path
        self.perplexity = perplexity  # eval loss is a next-token loss (not a pair loss): log exp(loss) too
        self.show_bar = sys.stderr.isatty() if show_bar is None else show_bar
        self.bar: tqdm | None = None
        self.started = 0.0
        self._last: tuple[float, int] | None = None  # (time, tokens trained) at the last training record
        self.count_tokens: Any = None  # () -> tokens trained so far on this process (set by the task's spine)

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: D102
        self.started = time.time()
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        self.bar = tqdm(total=state.max_steps, desc="training", unit="step", disable=not self.show_bar)

    def on_step_end(self, args, state, control, **kwargs):  # noqa: D102
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D102
        if not logs or not state.is_world_process_zero:
            return
        record = {
            "step": state.global_step,
            "epoch": round(state.epoch or 0, 4),
            "time": round(time.time() - self.started, 2),
        }
        record.update({k: v for k, v in logs.items() if isinstance(v, (int, float)) and math.isfinite(v)})
        if "loss" in logs and self.count_tokens is not None:
            # A running count kept on the CPU by the trainer: reading it syncs nothing; processes are alike
            tokens, now = self.count_tokens() * args.world_size, time.time()
            if self._last is not None and now > self._last[0] and tokens > self._last[1]:
                record["trained_tokens_per_second"] = round((tokens - self._last[1]) / (now - self._last[0]), 1)
            self._last = (now, tokens)
        peak = peak_memory_gib()
        if peak is not None:
            record["peak_memory_gib"] = peak
        if "eval_loss" in record and self.perplexity:
            record["eval_perplexity"] = math.exp(min(record["eval_loss"], 50))
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.bar is not None and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.2e}")
        if not self.show_bar:  # no terminal: one plain line per log event instead of a bar
            shown = ", ".join(f"{k}={_fmt(v)}" for k, v in record.items() if k not in ("time",))
            elapsed = time.time() - self.started
            eta = elapsed / max(state.global_step, 1) * (state.max_steps - state.global_step)
            print(f"[tunelab] {shown}, eta={eta:.0f}s", file=sys.stderr, flush=True)

    def on_train_end(self, args, state, control, **kwargs):  # noqa: D102
        if self.bar is not None:
            self.bar.close()


def peak_memory_gib() -> float | None:
    """This process's peak memory so far: accelerator memory allocated on CUDA, else resident memory (Linux)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return round(torch.cuda.max_memory_allocated() / 2**30, 3)
    try:
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # KiB on Linux
    except (ImportError, OSError):
        return None


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
