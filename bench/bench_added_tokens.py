"""What training the rows of added tokens costs in the chunked loss: the head's trained rows as a rank-k term beside
the frozen weight (speed/loss.py) against projecting with the weight PEFT rebuilds with the rows in it.

The default model with a LoRA adapter (r16, all linear layers) and --tokens new tokens whose rows PEFT trains
(`trainable_token_indices`, as `add_tokens` sets it up), one batch of --batch rows x --length random tokens; the
loss and its backward pass timed --steps times each way, alternating. Prints seconds per pass and the loss both ways
as Markdown, with the size of the head gradient the rank-k term does without.

Run from the repository root:

    PYTHONPATH=src .venv/bin/python bench/bench_added_tokens.py
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
    parser.add_argument("--tokens", type=int, default=4, help="tokens added")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model

    from tunelab.models import resolve_model
    from tunelab.models.load import load_causal_lm
    from tunelab.speed import loss

    torch.manual_seed(0)
    model = load_causal_lm(resolve_model(args.model))
    rows = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(rows + args.tokens, mean_resizing=False)
    new = list(range(rows, rows + args.tokens))
    config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", trainable_token_indices=new)
    model = get_peft_model(model, config)
    ids = torch.randint(0, rows + args.tokens, (args.batch, args.length))
    with_term = loss._token_rows_term

    def step(term: bool) -> tuple[float, float]:
        loss._token_rows_term = with_term if term else (lambda head, hidden: None)
        start = time.perf_counter()
        with loss.output_head_returns_hidden(model) as head:
            hidden = model(input_ids=ids).logits
        total, count = loss.causal_lm_loss_sum(hidden, head, ids)
        (total / count).backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start, float(total / count)

    step(True), step(False)  # warm-up
    times: dict[bool, list[float]] = {True: [], False: []}
    losses: dict[bool, float] = {}
    for _ in range(args.steps):
        for term in (True, False):
            seconds, losses[term] = step(term)
            times[term].append(seconds)
    loss._token_rows_term = with_term
    hidden_size = model.get_input_embeddings().weight.shape[1]
    print(f"{args.model}, {args.tokens} added tokens, batch {args.batch} x {args.length}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")  # fmt: skip
    print("\n| head's trained rows | s per forward+backward (median) | loss |\n| --- | ---: | ---: |")
    for term, name in (
        (True, "the rows' change at their columns, beside the frozen weight"),
        (False, "PEFT's rebuilt weight"),
    ):
        print(f"| {name} | {statistics.median(times[term]):.3f} | {losses[term]:.6f} |")
    print(f"\nhead gradient done without: {(rows + args.tokens) * hidden_size * 4 / 2**20:.0f} MiB (fp32)")


if __name__ == "__main__":
    main()
