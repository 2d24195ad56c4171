"""What dpo's use_weighting (WPO) costs: its per-token normaliser log sum_v p(v)^2 from one more projection of the
answer positions, forward only and in chunks (speed/loss.token_log_sum_sq_probs), against the policy pass alone;
and what the same normaliser would cost from the full logits (the plain path's, logits_log_sum_sq_probs).

The default model with a LoRA adapter (r16, all linear layers), one batch of --pairs pairs laid out as dpo lays
them (chosen rows, then rejected rows) of --length random tokens with the answer the second half of each row; the
policy's answer log-probs and their backward pass timed --steps times each way, alternating, and the peak of live
tensors of one pass measured each way (tunelab.memory.measure_peak: exact on a CPU). Prints Markdown.

Run from the repository root, nothing else running:

    PYTHONPATH=src .venv/bin/python bench/bench_wpo.py
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model

    from tunelab.memory import measure_peak
    from tunelab.methods.dpo import wpo_weights
    from tunelab.methods.preference import answer_logprobs
    from tunelab.models import resolve_model
    from tunelab.models.load import load_causal_lm

    torch.manual_seed(0)
    model = get_peft_model(load_causal_lm(resolve_model(args.model)), LoraConfig(r=16, target_modules="all-linear"))
    rows = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, rows, (2 * args.pairs, args.length))
    labels = ids.clone()
    labels[:, : args.length // 2] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def pass_of(squares: bool, fast: bool = True) -> float:
        per_token, log_sum_sq = answer_logprobs(model, model, batch, labels, fast, squares=squares)
        total = per_token.sum()
        if log_sum_sq is not None:
            total = total * wpo_weights(per_token, log_sum_sq, labels).mean()
        total.backward()
        model.zero_grad(set_to_none=True)
        return float(total)

    ways = {
        "policy log-probs alone (use_weighting off)": lambda: pass_of(False),
        "with WPO's normaliser, chunked (tunelab)": lambda: pass_of(True),
        "with WPO's normaliser from full logits (fast_loss off)": lambda: pass_of(True, fast=False),
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    for way in ways.values():  # warm up
        way()
    for _ in range(args.steps):
        for name, way in ways.items():
            started = time.perf_counter()
            way()
            times[name].append(time.perf_counter() - started)
    peaks = {name: measure_peak(way, model) for name, way in ways.items()}

    positions = 2 * args.pairs * (args.length // 2)
    print(f"{args.model}, LoRA r16 all-linear, fp32; {2 * args.pairs} rows x {args.length} tokens, {positions} answer")
    machine = platform.processor() or platform.machine()
    print(f"positions; torch {torch.__version__}, {machine}, {torch.get_num_threads()} threads\n")
    print("| policy pass (forward + backward) | s (median) | peak live tensors (MiB) |")
    print("| --- | ---: | ---: |")
    for name in ways:
        print(f"| {name} | {statistics.median(times[name]):.3f} | {peaks[name] / 2**20:,.0f} |")


if __name__ == "__main__":
    main()
