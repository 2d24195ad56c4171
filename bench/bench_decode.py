"""How fast the default model generates on this machine: the decode floor under GRPO's rollouts and `serve`.

Samples --tokens new tokens (no early stop) for --prompts chat prompts x --sequences each, with transformers'
`generate` and its KV cache, four ways: the base model alone, a fresh LoRA adapter (r16, all linear layers) as PEFT
runs it, the same after tunelab folds its dropout in (what a tunelab run's model is), and merged into the base.
Prints seconds per decoding step (one new token for every sequence) as Markdown.

Run from the repository root:

    PYTHONPATH=src .venv/bin/python bench/bench_decode.py
"""

from __future__ import annotations

import argparse
import platform
import time

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--sequences", type=int, default=6, help="completions per prompt (GRPO's num_generations)")
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model

    from tunelab.models import load_tokenizer, resolve_model
    from tunelab.models.load import load_causal_lm
    from tunelab.speed.lora_dropout import fuse_lora_dropout

    torch.manual_seed(0)
    source = resolve_model(args.model)
    model, tokenizer = load_causal_lm(source), load_tokenizer(source)
    tokenizer.padding_side = "left"
    asked = "What is {} + 4? Answer inside <answer></answer> tags."
    chats = [[{"role": "user", "content": asked.format(n)}] for n in range(args.prompts)]
    inputs = tokenizer.apply_chat_template(
        chats, add_generation_prompt=True, return_tensors="pt", padding=True, return_dict=True
    )

    def seconds_per_step(runner: torch.nn.Module) -> float:
        runner.eval()
        sample = {"do_sample": True, "num_return_sequences": args.sequences, "pad_token_id": tokenizer.pad_token_id}
        with torch.no_grad():
            runner.generate(**inputs, max_new_tokens=4, **sample)  # warm up
            start = time.perf_counter()
            runner.generate(**inputs, max_new_tokens=args.tokens, min_new_tokens=args.tokens, **sample)
        return (time.perf_counter() - start) / args.tokens

    rows = [("base model alone", seconds_per_step(model))]
    lora = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"))
    rows.append(("LoRA adapter, as PEFT runs it", seconds_per_step(lora)))
    fuse_lora_dropout(lora)
    rows.append(("LoRA adapter, dropout folded (a tunelab run's model)", seconds_per_step(lora)))
    lora.merge_adapter()
    rows.append(("LoRA merged into the base", seconds_per_step(lora)))

    sequences = args.prompts * args.sequences
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"{args.model}, {sequences} sequences x {args.tokens} new tokens; {machine}, torch {torch.__version__}\n")
    print("| model | s per decoding step | new tokens/s |\n| --- | ---: | ---: |")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} | {sequences / seconds:.0f} |")


if __name__ == "__main__":
    main()
