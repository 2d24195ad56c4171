"""What distill's chunked loss saves: both heads projected a chunk of positions at a time (speed/divergence.py)
against the full logits of student and teacher (what TRL's GKDTrainer computes, and tunelab's own path for heads
the chunks do not take).

The default model as both student (a LoRA adapter, r16, all linear layers, its B drawn) and teacher (frozen), one
batch of --batch rows x --length random tokens with the loss on the second half of each row; the loss and its backward
pass timed --steps times each way, alternating, and the peak of live tensors of one pass measured each way
(tunelab.memory.measure_peak: exact on a CPU; the student's weights included, the teacher's, the same both ways,
not). Prints Markdown.

Run from the repository root, nothing else running:

    PYTHONPATH=src .venv/bin/python bench/bench_distill.py
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
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--beta", type=float, default=0.0, help="distill_beta: 0 forward KL, 1 reverse, between JSD")
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model

    from tunelab.memory import measure_peak
    from tunelab.models import resolve_model
    from tunelab.models.load import load_causal_lm
    from tunelab.speed.divergence import divergence_sum, divergence_sum_plain
    from tunelab.speed.loss import head_dtype, output_head_returns_hidden

    torch.manual_seed(0)
    source = resolve_model(args.model)
    teacher = load_causal_lm(source).requires_grad_(False).eval()
    # B drawn, not zero: the student differs from the teacher from the start, and the loss is not 0
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    student = get_peft_model(load_causal_lm(source), lora)
    rows = student.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, rows, (args.batch, args.length))
    labels = ids.clone()
    labels[:, : args.length // 2] = -100  # the answers: the second half of each row
    shift = labels[:, 1:]
    mask = shift != -100
    settings = (args.beta, 1.0, 0.0)

    def chunked() -> float:
        with output_head_returns_hidden(student) as head:
            hidden = student(input_ids=ids).logits
        with torch.no_grad(), output_head_returns_hidden(teacher) as teacher_head:
            teacher_hidden = teacher(input_ids=ids).logits
        total = divergence_sum(
            hidden[:, :-1][mask], head, teacher_hidden[:, :-1][mask], teacher_head, shift[mask], *settings,
            head_dtype(head), head_dtype(teacher_head),
        )  # fmt: skip
        return _backward(total / int(mask.sum()))

    def full() -> float:
        logits = student(input_ids=ids).logits
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids).logits
        total = divergence_sum_plain(logits[:, :-1][mask], teacher_logits[:, :-1][mask], shift[mask], *settings)
        return _backward(total / int(mask.sum()))

    def _backward(loss: torch.Tensor) -> float:
        loss.backward()
        student.zero_grad(set_to_none=True)
        return loss.item()

    ways = {"chunks (tunelab)": chunked, "full logits of both models": full}
    peaks = {name: measure_peak(way, student) for name, way in ways.items()}  # also the warm-up
    times: dict[str, list[float]] = {name: [] for name in ways}
    losses: dict[str, float] = {}
    for _ in range(args.steps):
        for name, way in ways.items():
            start = time.perf_counter()
            losses[name] = way()
            times[name].append(time.perf_counter() - start)
    print(f"{args.model} as student (LoRA r16) and teacher, batch {args.batch} x {args.length}, distill_beta "
          f"{args.beta:g}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")  # fmt: skip
    print("\n| distill loss from | s per forward+backward (median) | peak live tensors (MiB) | loss |")
    print("| --- | ---: | ---: | ---: |")
    for name in ways:
        print(f"| {name} | {statistics.median(times[name]):.3f} | {peaks[name] / 2**20:,.0f} | {losses[name]:.6f} |")


if __name__ == "__main__":
    main()
