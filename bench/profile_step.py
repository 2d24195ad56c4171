"""Profile tunelab's training step with torch.profiler and print where the time goes, largest first.

The job is bench_sft.py's (the same arguments: model, data, batch, block size, LoRA, checkpointing...), built
through tunelab's real path. The first --warmup-steps steps run unprofiled (the allocator and the first, longest
batches settle), the rest of --steps under torch.profiler (CPU, and CUDA when there is a GPU). It prints the self
time per step (the ops' own time, children excluded) grouped by what it is: matmuls, elementwise work, attention,
random numbers (the dropout masks), copies and casts, the optimizer, the loss, the rest; then the costliest ops.
With PROFILE_FLOPS=1 the profiler also counts the matmul FLOPs (slowing the profiled steps), printed against the
machine's own fp32 matmul peak (`torch.mm` of 2048 x 2048 on the same threads), measured in the same run.

    PYTHONPATH=src .venv/bin/python bench/profile_step.py --model HuggingFaceTB/SmolLM2-135M-Instruct \
        --data ../shared/data/alpaca --block-size 256 --batch-size 4 --steps 14 --warmup-steps 8 [--trace t.json]
"""

from __future__ import annotations

import collections
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Self-time categories, first match wins (aten op names).
CATEGORIES = (
    ("attention", ("_scaled_dot_product", "scaled_dot_product", "flash_attention", "_efficient_attention", "softmax")),
    ("matmul", ("mm", "addmm", "bmm", "matmul", "linear", "baddbmm")),
    ("random (dropout masks)", ("bernoulli", "random_", "uniform_", "rand", "dropout")),
    ("optimizer", ("_foreach", "_fused_adam", "lerp", "addcdiv", "addcmul", "sqrt")),
    ("loss", ("cross_entropy", "log_softmax", "nll_loss", "logsumexp")),
    ("copies and casts", ("copy_", "to", "_to_copy", "contiguous", "clone", "cat", "index", "gather", "scatter")),
    ("elementwise", ("mul", "add", "sub", "div", "silu", "sigmoid", "rsqrt", "pow", "mean", "sum", "neg", "where")),
)


def category(name: str) -> str:
    op = name.removeprefix("aten::")
    for label, keys in CATEGORIES:
        if any(op == key or op.startswith(key + "_") or op.startswith(key) for key in keys):
            return label
    return "other"


def main(argv: list[str] | None = None) -> int:
    import bench_sft

    argv = list(sys.argv[1:] if argv is None else argv)
    trace = None
    if "--trace" in argv:
        at = argv.index("--trace")
        trace = argv[at + 1]
        del argv[at : at + 2]
    args = bench_sft.parse_args(argv)
    args._side = "tunelab"
    import torch
    import transformers
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    transformers.logging.set_verbosity_error()
    params = bench_sft.make_params(args)
    tokenizer, source, _, rows = bench_sft.prepare_data(args, params)
    trainer = bench_sft.build_tunelab(args, params, tokenizer, source, rows)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    meter = bench_sft.Meter(args)
    meter.attach(trainer)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    profiler = profile(activities=activities, with_flops=os.environ.get("PROFILE_FLOPS") == "1")

    class Window(TrainerCallback):
        def on_step_end(self, args_, state, control, **kwargs):  # noqa: D102
            if state.global_step == args.warmup_steps:
                profiler.__enter__()

        def on_train_end(self, args_, state, control, **kwargs):  # noqa: D102
            profiler.__exit__(None, None, None)

    trainer.add_callback(Window())
    trainer.train()
    result = meter.summary()
    events = profiler.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1
    by_category: dict[str, float] = collections.defaultdict(float)
    for e in events:
        by_category[category(e.key)] += e.self_cpu_time_total
    flops = sum(e.flops or 0 for e in events)
    profiled_steps = args.steps - args.warmup_steps
    wall = result["timed_wall_s"]
    peak = bench_sft.matmul_peak()
    print(
        f"\nprofiled {profiled_steps} steps: {result['timed_tokens']} tokens in {wall:.1f} s, "
        f"{result['tokens_per_s']:.0f} tokens/s"
    )
    if flops:
        print(
            f"matmul FLOPs counted by the profiler: {flops / 1e9:.0f} GFLOP = {flops / wall / 1e9:.0f} GFLOP/s "
            f"(the counting slows the steps); this machine's torch.mm 2048^2 fp32 peak on "
            f"{torch.get_num_threads()} threads: {peak:.0f} GFLOP/s ({flops / wall / 1e9 / peak:.0%} of it)"
        )
    else:
        print(f"this machine's torch.mm 2048^2 fp32 peak: {peak:.0f} GFLOP/s (PROFILE_FLOPS=1 counts the step's)")
    print("\n| where | self CPU time | share |\n| --- | ---: | ---: |")
    for label, micros in sorted(by_category.items(), key=lambda kv: -kv[1]):
        print(f"| {label} | {micros / 1e6 / profiled_steps:.3f} s/step | {micros / total:.1%} |")
    print(events.table(sort_by="self_cpu_time_total", row_limit=25))
    if trace:
        profiler.export_chrome_trace(trace)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    raise SystemExit(main())
