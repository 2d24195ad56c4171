"""Benchmark a GRPO job through tunelab: steps per second and generated tokens per second, printed as Markdown.

The job: one-step arithmetic prompts (generated here, as in tests/test_grpo_smollm2.py) answered in
`<answer>N</answer>` form, rewarded by the built-in format_tag and answer_tag, LoRA on the default model. Figures
come from the run's own metrics.jsonl: the elapsed time logged at every step, and each step's mean completion
length times the completions it generated. The first --warmup-steps steps are run but not timed.

Run from the repository root (CPU; on a GPU the same command uses it):

    PYTHONPATH=src .venv/bin/python bench/bench_grpo.py --steps 8 --warmup-steps 2
    PYTHONPATH=src python bench/bench_grpo.py --steps 20 --num-generations 8 --max-completion-length 128 --bf16
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2, help="prompts per micro-batch")
    parser.add_argument("--gradient-accumulation", type=int, default=1)
    parser.add_argument(
        "--prompts-per-generation", type=int, help="prompts per generate call (default: the whole sampling's)"
    )
    parser.add_argument(
        "--steps-per-generation", type=int, help="micro-batches one sampling serves (default: a step's, TRL's)"
    )
    parser.add_argument("--num-generations", type=int, default=6)
    parser.add_argument("--max-completion-length", type=int, default=32)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--out", help="also write the figures as JSON here")
    args = parser.parse_args()

    import torch

    import tunelab

    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-grpo-") as tmp:
        data = Path(tmp) / "prompts.jsonl"
        with data.open("w") as out:
            for _ in range(max(64, args.steps * args.batch_size)):
                a, b = rng.randint(1, 20), rng.randint(1, 20)
                prompt = f"What is {a} + {b}? Answer with the number inside <answer></answer> tags."
                out.write(json.dumps({"prompt": prompt, "answer": str(a + b)}) + "\n")
        run = Path(tmp) / "run"
        started = time.time()
        tunelab.train(
            model=args.model, trainer="grpo", peft=True, data_path=str(data), project_name=str(run),
            chat_template="tokenizer", reward_functions="format_tag,answer_tag", num_generations=args.num_generations,
            batch_size=args.batch_size, gradient_accumulation=args.gradient_accumulation,
            prompts_per_generation=args.prompts_per_generation, max_completion_length=args.max_completion_length,
            steps_per_generation=args.steps_per_generation,
            max_steps=args.steps, lr=3e-4, logging_steps=1, completions_every=0,
            mixed_precision="bf16" if args.bf16 else None, disable_gradient_checkpointing=True,
        )  # fmt: skip
        wall = time.time() - started
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # every step's record (with steps_per_generation, only a sampling's first step has the rewards and lengths)
    steps = [r for r in records if "loss" in r and "time" in r]
    timed = steps[args.warmup_steps :]
    elapsed = timed[-1]["time"] - steps[args.warmup_steps - 1]["time"] if args.warmup_steps else timed[-1]["time"]
    together = (args.steps_per_generation or args.gradient_accumulation) // args.gradient_accumulation
    per_step = args.batch_size * args.gradient_accumulation * args.num_generations
    sampled = [r for r in timed if "completions/mean_length" in r]
    generated = sum(r["completions/mean_length"] * per_step * together for r in sampled)
    rewarded = [r for r in steps if "reward" in r]
    step_times = [b["time"] - a["time"] for a, b in zip(steps[args.warmup_steps - 1 :], timed, strict=False)]
    figures = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", CPU"),
        "versions": f"torch {torch.__version__}, tunelab {tunelab.__version__}",
        "model": args.model,
        "completions per step": per_step,
        "micro-batches per step": args.gradient_accumulation,
        "steps per sampling": together,
        "prompts per generate call": args.prompts_per_generation
        or args.batch_size * args.gradient_accumulation * together,
        "max completion length": args.max_completion_length,
        "timed steps": len(timed),
        "steps/s": round(len(timed) / elapsed, 4),
        "median step (s)": round(statistics.median(step_times), 2),
        "generated tokens/s": round(generated / elapsed, 1),
        "mean completion length": round(statistics.mean(r["completions/mean_length"] for r in sampled), 1),
        "reward first -> last sampling": f"{rewarded[0]['reward']:.3f} -> {rewarded[-1]['reward']:.3f}",
        "wall (s, incl. loading)": round(wall, 1),
    }
    print("| figure | value |\n| --- | --- |")
    for name, value in figures.items():
        print(f"| {name} | {value} |")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
