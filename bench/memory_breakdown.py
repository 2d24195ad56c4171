"""Where a CPU training run's resident memory goes: RSS after each stage of tunelab's real path, and during training
the peak RSS split into what the process's tensors, the allocator and the rest hold.

Stages: imports, tokenizer + data, `load_model`, `build_trainer`, then --steps optimizer steps of the same job as
bench_sft.py (the same arguments). For each stage it prints the resident set (anonymous and file-backed, from
/proc/self/smaps_rollup) and glibc's heap figures (mallinfo2: bytes in use, bytes free but kept, bytes in mmapped
blocks). During training a thread samples them every few milliseconds; the sample with the largest RSS is
printed, with the peak of live tensor storages (`tunelab.memory.LiveTensors`, exact, weights included) beside it:

    peak RSS = live tensors + heap kept free (fragmentation) + code, libraries and Python objects

Run from the repository root, on an idle machine (the figures are memory, not time, but a busy machine changes
the allocator's timing little):

    PYTHONPATH=src .venv/bin/python bench/memory_breakdown.py --model HuggingFaceTB/SmolLM2-135M-Instruct \
        --data ../shared/data/alpaca --block-size 256 --batch-size 4 --steps 6 [--gradient-checkpointing] [--live]
"""

from __future__ import annotations

import ctypes
import gc
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
MiB = 2**20


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
        + ("keepcost",)
    ]


def _libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
        return libc
    except (OSError, AttributeError):
        return None


LIBC = _libc()


def snapshot() -> dict[str, int]:
    """RSS (anonymous, file-backed) and glibc's heap: in use, free but kept, in mmapped blocks (bytes)."""
    figures: dict[str, int] = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Anonymous", "Shared_Clean", "Private_Clean", "Private_Dirty"):
                figures[key] = int(rest.split()[0]) * 1024
    if LIBC is not None:
        info = LIBC.mallinfo2()
        figures["heap_in_use"] = info.uordblks
        figures["heap_free_kept"] = info.fordblks
        figures["mmapped"] = info.hblkhd
        figures["heap_top_free"] = info.keepcost  # free at the heap's top: what malloc_trim could give back cheaply
    return figures


def describe(stage: str, figures: dict[str, int]) -> str:
    file_backed = figures.get("Rss", 0) - figures.get("Anonymous", 0)
    heap = ""
    if "heap_in_use" in figures:
        heap = (
            f" | heap: in use {figures['heap_in_use'] / MiB:7.0f}, free kept {figures['heap_free_kept'] / MiB:6.0f},"
            f" mmapped blocks {figures['mmapped'] / MiB:6.0f}"
        )
    return (
        f"{stage:<28} RSS {figures.get('Rss', 0) / MiB:7.0f} MiB (anonymous {figures.get('Anonymous', 0) / MiB:6.0f},"
        f" file-backed {file_backed / MiB:5.0f}){heap}"
    )


class Sampler(threading.Thread):
    """Samples `snapshot()` every `interval` seconds and keeps the sample with the largest RSS."""

    def __init__(self, interval: float = 0.003) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak: dict[str, int] = {}
        self.allocated_peak = 0  # the most glibc had handed out at once (heap in use + mmapped blocks)
        self.running = True

    def run(self) -> None:
        while self.running:
            figures = snapshot()
            if figures.get("Rss", 0) > self.peak.get("Rss", 0):
                self.peak = figures
            self.allocated_peak = max(self.allocated_peak, figures.get("heap_in_use", 0) + figures.get("mmapped", 0))
            time.sleep(self.interval)


def main(argv: list[str] | None = None) -> int:
    import bench_sft

    argv = list(sys.argv[1:] if argv is None else argv)
    track_live = "--live" in argv  # the exact live-tensor peak (a dispatch mode: slower, same allocations)
    argv = [a for a in argv if a != "--live"]
    args = bench_sft.parse_args(argv)
    args._side = "tunelab"
    print(describe("start", snapshot()))
    import torch  # noqa: F401
    import transformers

    import tunelab.models  # noqa: F401
    import tunelab.training.trainer  # noqa: F401

    transformers.logging.set_verbosity_error()
    print(describe("imports", snapshot()))
    params = bench_sft.make_params(args)
    tokenizer, source, _, rows = bench_sft.prepare_data(args, params)
    gc.collect()
    print(describe(f"tokenizer + data ({len(rows)} rows)", snapshot()))
    trainer = bench_sft.build_tunelab(args, params, tokenizer, source, rows)
    gc.collect()
    print(describe("load_model + build_trainer", snapshot()))

    from tunelab.memory import LiveTensors, _model_bytes

    model_bytes = _model_bytes(trainer.model)
    sampler = Sampler()
    sampler.start()
    live = LiveTensors() if track_live else None
    if live is not None:
        with live:
            trainer.train()
    else:
        trainer.train()
    sampler.running = False
    sampler.join()
    peak = sampler.peak
    print(describe(f"training peak ({args.steps} steps)", peak))
    print(
        f"{'':<28} at that moment the heap's top had {peak.get('heap_top_free', 0) / MiB:,.0f} MiB free; the most"
        f" malloc handed out at once during training: {sampler.allocated_peak / MiB:,.0f} MiB"
    )
    if live is not None:
        tensors = model_bytes + live.peak
        rest = peak["Rss"] - tensors - peak.get("heap_free_kept", 0)
        print(
            f"\npeak RSS {peak['Rss'] / MiB:,.0f} MiB = live tensors at their peak {tensors / MiB:,.0f} (weights and"
            f" adapter {model_bytes / MiB:,.0f}) + heap kept free {peak.get('heap_free_kept', 0) / MiB:,.0f}"
            f" + the rest (code, libraries, Python objects) {rest / MiB:,.0f}"
        )
    print(describe("after training", snapshot()))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    raise SystemExit(main())
