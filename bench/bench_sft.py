"""Benchmark one SFT job through tunelab and through plain TRL `SFTTrainer`, and print a Markdown table.

Both sides train the same examples: the data is read, rendered (Alpaca rows through tunelab's alpaca template),
tokenized, truncated to --block-size and filtered by tunelab's own pipeline (`load_data` and the sft method's
`build_rows`), and TRL is given the resulting `input_ids` and `labels` as a pre-tokenized dataset, so the two
trainers see identical token ids and loss masks. Batch size, optimizer, learning rate and schedule, seed, LoRA
config, gradient checkpointing and dtype are the same on both sides: TRL's arguments are copied from the
TrainingArguments tunelab builds. Unpacked, both sides train the same batches in the same order (with
--group-by-length, tunelab's default, TRL is handed tunelab's seeded length-grouped batch order); tunelab collates
them its way (rows kept apart by position ids, or laid end to end under flash attention) and TRL pads them with an
attention mask. Packed (--packing), tunelab packs best-fit decreasing and TRL with its own `bfd` strategy
(padding-free), so the rows, and the losses step by step, differ a little.

Each side runs in its own subprocess (this script re-invoking itself with --_side), so its peak memory is its own:
torch.cuda.max_memory_allocated on CUDA, the peak resident set size of the process during training on CPU.
Measured per side: tokens/s (input tokens that are not padding, over the timed steps' wall time), the median
step time, peak memory, the loss at every step, and on CUDA the MFU (6 * parameters * tokens/s over the
GPU's peak bf16 FLOP/s). The first --warmup-steps steps are trained but not timed.

The tunelab side imports neither trl nor datasets (only the TRL side does), so it runs on a machine without them.

Run from the repository root:

    PYTHONPATH=src .venv/bin/python bench/bench_sft.py --steps 20 --warmup-steps 3 --batch-size 4 --block-size 256
    PYTHONPATH=src python bench/bench_sft.py --shape 1b --bf16 --sides tunelab,trl --out bench-1b.json

See bench/README.md for the documented CPU and GPU commands.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # tunelab.config.base.DEFAULT_MODEL
DATA_CANDIDATES = (
    REPO / "shared" / "data" / "alpaca",
    Path("/work/shared/data/alpaca"),
    REPO.parent / "shared" / "data" / "alpaca",
    REPO / "samples" / "alpaca.jsonl",
)
SIDES = ("tunelab", "trl")

# Random-init Llama-architecture models at real shapes.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(  # 2 small layers: a smoke run of this script (tests/test_bench.py), not a benchmark
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "135m": dict(  # SmolLM2-135M
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "1b": dict(  # Llama-3.2-1B
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "7b": dict(  # Mistral-7B
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", help=f"model id, folder or .gguf file (default {DEFAULT_MODEL})")
    which.add_argument("--shape", choices=sorted(SHAPES), help="random-init Llama model at this real shape")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer: a model id, folder or .gguf (default: the model's own; for --shape, the default model's)",
    )
    parser.add_argument("--data", default=None, help="data file or folder (default /work/shared/data/alpaca)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps trained")
    parser.add_argument("--warmup-steps", type=int, default=5, help="first steps excluded from timing")
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation (a step is an update)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--peft", action=argparse.BooleanOptionalAction, default=True, help="LoRA r16 a32 all-linear")
    parser.add_argument(
        "--freeze-layers",
        type=int,
        default=None,
        help="with --no-peft: train the last N decoder layers only (tunelab's freeze_trainable_layers; the TRL side "
        "sets requires_grad off on the others, as a TRL user does)",
    )
    parser.add_argument("--packing", action="store_true", help="pack examples into --block-size rows")
    parser.add_argument(
        "--group-by-length",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="unpacked: batch examples of similar length (tunelab's default; TRL gets the same batch order)",
    )
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument(
        "--defaults",
        action="store_true",
        help="each side as its users run it: TRL's own batch order (random, padded to the longest) and "
        "tunelab's length grouping; gradient checkpointing on for both (TRL's default; tunelab's is auto, which "
        "bench_peers.py runs through the CLI; --checkpoint-every 0 is what auto picks when memory allows)",
    )
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (LoRA: bf16 base weights)")
    parser.add_argument("--torch-compile", action="store_true", help="tunelab side: torch.compile each layer")
    parser.add_argument(
        "--fused-ops",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="tunelab side: memory-lean RMSNorm, SwiGLU and LoRA dropout",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=1,
        help="tunelab side: with checkpointing, checkpoint every Nth layer; 0: none (TRL keeps its setting)",
    )
    parser.add_argument("--sides", default="tunelab,trl", help="comma-separated: tunelab, trl, or both")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="GPU peak bf16 TFLOP/s for MFU (H100)")
    parser.add_argument("--out", help="also write the results to this JSON file")
    parser.add_argument("--_side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--_result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not sides or any(s not in SIDES for s in sides):
        parser.error(f"--sides: pick from {', '.join(SIDES)}")
    args.sides = sides
    if args.warmup_steps < 0 or args.warmup_steps >= args.steps:
        parser.error("--warmup-steps must be at least 0 and fewer than --steps")
    if args.freeze_layers is not None and (args.peft or args.freeze_layers < 1):
        parser.error("--freeze-layers N: a whole number, 1 or more, with --no-peft")
    if args.checkpoint_every < 0:
        parser.error("--checkpoint-every must be 0 (no checkpointing on tunelab's side) or more")
    if args.data is None:
        args.data = str(next((p for p in DATA_CANDIDATES if p.exists()), DATA_CANDIDATES[-1]))
    if args.model is None and args.shape is None:
        args.model = DEFAULT_MODEL
    return args


# --------------------------------------------------------------------------- parent: run the sides, print the table


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    if args.defaults:
        args.gradient_checkpointing = True  # TRL's SFTConfig default (tunelab's own is auto: --checkpoint-every)
    if args._side:
        result = run_side(args)
        Path(args._result).write_text(json.dumps(result, indent=2), encoding="utf-8")
        return 0

    results: dict[str, dict[str, Any]] = {}
    for side in args.sides:
        print(f"== {side} ==", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            result_file = Path(tmp) / "result.json"
            command = [sys.executable, str(Path(__file__).resolve()), *raw, "--_side", side]
            command += ["--_result", str(result_file)]
            code = subprocess.call(command)
            if code == 0 and result_file.is_file():
                results[side] = json.loads(result_file.read_text(encoding="utf-8"))
            else:
                results[side] = {"side": side, "failed": f"exit code {code}"}

    report = render_report(args, results)
    print()
    print(report)
    if args.out:
        config = {k: v for k, v in vars(args).items() if not k.startswith("_")}
        payload = {"config": config, "results": results, "ratios": ratios(results), "table": report}
        Path(args.out).write_text(json.dumps(payload, indent=2), encoding="utf-8")
        print(f"\nwrote {args.out}")
    return 0 if all("failed" not in r for r in results.values()) else 1


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    a, b = results.get("tunelab", {}), results.get("trl", {})
    out = {}
    for key in ("tokens_per_s", "peak_memory_bytes", "median_step_s"):
        if a.get(key) and b.get(key):
            out[key] = a[key] / b[key]
    return out


def checkpointing(args: argparse.Namespace) -> str:
    if not args.gradient_checkpointing:
        return "off"
    if args.checkpoint_every == 1:
        return "on"
    if args.checkpoint_every == 0:
        return f"tunelab off, {'TRL every layer (its default)' if args.defaults else 'TRL on'}"
    trl = "TRL every layer (its default)" if args.defaults else "TRL the same"
    return f"on, tunelab every {args.checkpoint_every} layers, {trl}"


def _trained(args: argparse.Namespace) -> str:
    if args.peft:
        return "LoRA r16 all-linear"
    return f"the last {args.freeze_layers} layers (freeze)" if args.freeze_layers else "full"


def render_report(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> str:
    sides = [s for s in args.sides if s in results]
    first = next((results[s] for s in sides if "failed" not in results[s]), {})
    what = f"shape {args.shape} (random init)" if args.shape else args.model
    layout = "packed" if args.packing else "unpacked, grouped by length" if args.group_by_length else "unpacked"
    if args.defaults and not args.packing:
        layout = "unpacked: tunelab groups by length, TRL in its own random order (--defaults)"
    lines = [
        f"SFT benchmark: {what}; data {args.data}; device {first.get('device', '?')}",
        f"batch {args.batch_size} x accum {args.grad_accum}, block {args.block_size}, {args.steps} steps "
        f"({args.warmup_steps} warmup, untimed), lr {args.lr}, {_trained(args)}, "
        f"{layout}, "
        f"gradient checkpointing {checkpointing(args)}, {'bf16' if args.bf16 else 'fp32'}",
        "",
    ]
    ratio = ratios(results)

    def cell(side: str, key: str, fmt: str) -> str:
        value = results[side].get(key)
        if "failed" in results[side]:
            return "failed"
        return "-" if value is None else format(value, fmt)

    def mem(side: str) -> str:
        r = results[side]
        if "failed" in r:
            return "failed"
        return f"{r['peak_memory_bytes'] / 2**30:.2f} GiB ({r['memory_kind']})"

    last = args.steps
    rows = [
        ("tokens/s (non-pad)", lambda s: cell(s, "tokens_per_s", ",.0f"), ratio.get("tokens_per_s")),
        ("median step (s)", lambda s: cell(s, "median_step_s", ".3f"), ratio.get("median_step_s")),
        ("peak memory", mem, ratio.get("peak_memory_bytes")),
        (f"loss at step {last}", lambda s: _loss_at(results[s], last), None),
        ("MFU", lambda s: cell(s, "mfu", ".1%"), None),
        ("trained tokens/s", lambda s: cell(s, "trained_tokens_per_s", ",.0f"), None),
        ("padding share", lambda s: cell(s, "padding_share", ".1%"), None),
        ("rows (examples)", lambda s: f"{results[s].get('rows', '-')} ({results[s].get('examples', '-')})", None),
        ("trainable / all params", lambda s: _params(results[s]), None),
    ]
    header = ["", *[("tunelab" if s == "tunelab" else "TRL") for s in sides]]
    if len(sides) == 2:
        header.append("tunelab/TRL")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join([" --- "] + [" ---: "] * (len(header) - 1)) + "|")
    for name, fn, r in rows:
        cells = [name, *[fn(s) for s in sides]]
        if len(sides) == 2:
            cells.append(f"{r:.2f}x" if r else "")
        lines.append("| " + " | ".join(cells) + " |")

    job = results.get("tunelab", {})
    if job.get("flops_per_token") and not torch_cuda(results):
        per_token, peak = job["flops_per_token"], job["matmul_peak_gflops"]
        lines.append("")
        lines.append(
            f"The job's matmul work, counted by torch.utils.flop_counter on tunelab's batches in training order "
            f"(attention's not included: the counter has no formula for the CPU attention kernel): "
            f"{per_token / 1e9:.3f} GFLOP per token. This machine's fp32 matmul peak (torch.mm 2048^2, measured in "
            f"tunelab's process after training): {peak:.0f} GFLOP/s."
        )
        for side in sides:
            rate = results[side].get("tokens_per_s")
            if rate:
                name = "tunelab" if side == "tunelab" else "TRL"
                lines.append(
                    f"- {name}: {rate * per_token / 1e9:.0f} GFLOP/s of the job's work = "
                    f"{rate * per_token / 1e9 / peak:.0%} of that peak"
                )
    lines += ["", "| step | " + " | ".join(header[1 : 1 + len(sides)]) + " |"]
    lines.append("| ---: |" + " ---: |" * len(sides))
    for step in range(1, args.steps + 1):
        marker = "" if step > args.warmup_steps else " (warmup)"
        lines.append(f"| {step}{marker} | " + " | ".join(_loss_at(results[s], step) for s in sides) + " |")
    return "\n".join(lines)


def torch_cuda(results: dict[str, dict[str, Any]]) -> bool:
    return any("cuda" in str(r.get("device", "")).lower() for r in results.values())


def _loss_at(result: dict[str, Any], step: int) -> str:
    loss = result.get("losses", {}).get(str(step))
    return "-" if loss is None else f"{loss:.4f}"


def _params(result: dict[str, Any]) -> str:
    if "failed" in result:
        return "failed"
    return f"{result['trainable_params'] / 1e6:,.2f}M / {result['total_params'] / 1e6:,.1f}M"


# --------------------------------------------------------------------------- child: one side (imports torch & co.)


def run_side(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    transformers.logging.set_verbosity_warning()
    started = time.perf_counter()
    params = make_params(args)
    from tunelab.env import check_machine, device_name

    check_machine(params)
    tokenizer, model_source, examples, rows = prepare_data(args, params)
    if args._side == "tunelab":
        trainer = build_tunelab(args, params, tokenizer, model_source, rows)
    else:
        trainer = build_trl(args, params, tokenizer, model_source, examples)

    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the meter prints a line per step (build_trainer removed it already)
    meter = Meter(args)
    meter.attach(trainer)
    setup_s = time.perf_counter() - started
    trainer.train()

    model = trainer.model
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = meter.summary()
    result.update(
        side=args._side,
        device=device_name(),
        total_params=total,
        trainable_params=trainable,
        rows=len(trainer.train_dataset),
        examples=len(examples),
        setup_s=round(setup_s, 2),
        versions={"torch": torch.__version__, "transformers": transformers.__version__},
    )
    if args._side == "trl":
        import trl

        result["versions"]["trl"] = trl.__version__
    if torch.cuda.is_available() and result["tokens_per_s"]:
        result["mfu"] = 6 * total * result["tokens_per_s"] / (args.peak_tflops * 1e12)
    if args._side == "tunelab":
        # The job's own FLOPs (what tunelab computes: no logits outside the answers, nothing for padding), counted by
        # torch on real batches, against the machine's matmul peak measured now, in this process, on its threads.
        result["flops_per_token"] = flops_per_token(trainer)
        result["matmul_peak_gflops"] = None if torch.cuda.is_available() else matmul_peak()  # GPUs: MFU instead
    shutil.rmtree(trainer.args.output_dir, ignore_errors=True)
    return result


def flops_per_token(trainer: Any, batches: int = 8) -> float:
    """Matmul FLOPs of a forward and backward pass per non-padding token, counted by torch.utils.flop_counter on
    the first `batches` batches training draws (the job's work, whichever tool does it)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model, dataset, rows = trainer.model, trainer.train_dataset, trainer.args.per_device_train_batch_size
    # The batches as training draws them (tunelab's sampler groups rows of similar lengths): the dataset's own order
    # pads each batch to lengths its rows don't share, and counted that padding's FLOPs as the job's work (0.742
    # against 0.532 GFLOP per token on the SmolLM2 job, session 18).
    order = list(trainer._get_train_sampler())
    flops = tokens = 0
    for b in range(min(batches, len(order) // rows)):
        features = [dataset[i] for i in order[b * rows : (b + 1) * rows]]
        batch = trainer._prepare_inputs(trainer.data_collator(features))
        with FlopCounterMode(display=False) as counter:
            trainer.compute_loss(model, batch).backward()
        model.zero_grad(set_to_none=True)
        flops += counter.get_total_flops()
        tokens += sum(_length(feature) for feature in features)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return flops / max(tokens, 1)


def matmul_peak(size: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of torch.mm on two fp32 size x size matrices on this process's threads (the best of three)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9)
    return best


def make_params(args: argparse.Namespace) -> Any:
    """The job as tunelab's LLMParams; the TRL side reads its settings from here too."""
    import torch

    from tunelab.config.base import field_names
    from tunelab.config.llm import LLMParams

    extra = {"group_by_length": args.group_by_length} if "group_by_length" in field_names(LLMParams) else {}
    return LLMParams(
        **extra,
        model=args.model or args.tokenizer or DEFAULT_MODEL,
        project_name="bench-sft",
        data_path=args.data,
        trainer="sft",
        block_size=args.block_size,
        model_max_length=max(2048, args.block_size),
        packing=args.packing,
        lr=args.lr,
        max_steps=args.steps,
        batch_size=args.batch_size,
        gradient_accumulation=args.grad_accum,
        optimizer="adamw_torch_fused" if torch.cuda.is_available() else "adamw_torch",
        seed=args.seed,
        mixed_precision="bf16" if args.bf16 else None,
        disable_gradient_checkpointing=not args.gradient_checkpointing
        or (args._side == "tunelab" and args.checkpoint_every == 0),
        torch_compile=args.torch_compile,
        fused_ops=args.fused_ops,
        checkpoint_every=max(1, args.checkpoint_every),
        peft=args.peft,
        freeze_trainable_layers=None if args.peft else args.freeze_layers,
        lora_r=16,
        lora_alpha=32,
        target_modules="all-linear",
        logging_steps=1,
        log="none",
    )


def prepare_data(args: argparse.Namespace, params: Any) -> tuple[Any, Any, list[Any], list[Any]]:
    """tunelab's data path: tokenizer, rendered and tokenized examples, truncated (and packed) rows.

    Returns the tokenizer, where the model comes from (None for --shape), the truncated examples (what TRL is
    given) and the sft rows (what tunelab trains: the same examples, packed when --packing)."""
    import dataclasses

    from tunelab.data import load_data
    from tunelab.data.tokenize import IGNORE, Encoded
    from tunelab.methods import METHODS
    from tunelab.models import load_tokenizer
    from tunelab.models.load import ModelSource, resolve_model

    model_source = resolve_model(args.model) if args.model else None
    tok_name = args.tokenizer or (args.model if args.model else DEFAULT_MODEL)
    if args.tokenizer and Path(tok_name).is_dir() and not (Path(tok_name) / "config.json").is_file():
        tok_source = ModelSource(tok_name, tok_name)  # a saved tokenizer folder (no model config)
    elif model_source is not None and tok_name == args.model:
        tok_source = model_source
    else:
        tok_source = resolve_model(tok_name)
    tokenizer = load_tokenizer(tok_source, params.model_max_length)
    data = load_data(params, tokenizer)
    encoded = data.train
    if args.shape:  # ids must be < the shape's vocabulary: fold larger ones into it
        vocab = SHAPES[args.shape]["vocab_size"]
        if len(tokenizer) > vocab:
            encoded = [
                Encoded([i % vocab for i in e.input_ids], [x if x == IGNORE else x % vocab for x in e.labels])
                for e in encoded
            ]
    method = METHODS["sft"]
    rows, _ = method.build_rows(encoded, params)
    examples, _ = method.build_rows(encoded, dataclasses.replace(params, packing=False))
    return tokenizer, model_source, examples, rows


def base_dtype(params: Any) -> Any:
    """The dtype tunelab's load_model gives the base weights: the half type for LoRA under mixed precision."""
    import torch

    return torch.bfloat16 if (params.peft and params.mixed_precision == "bf16") else torch.float32


def shape_model(args: argparse.Namespace, params: Any, pad_token_id: int | None) -> Any:
    """A random-init Llama model at --shape, built straight on the GPU when there is one."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, set_seed

    config = LlamaConfig(
        **SHAPES[args.shape],
        max_position_embeddings=max(4096, args.block_size),
        rms_norm_eps=1e-5,
        pad_token_id=pad_token_id,
        use_cache=False,
    )
    set_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=base_dtype(params))
    model.config.use_cache = False
    return model


def build_tunelab(args: argparse.Namespace, params: Any, tokenizer: Any, source: Any, rows: list[Any]) -> Any:
    """tunelab's real path, as run.py wires it: load_model (or a shape plus add_lora), then build_trainer."""
    from transformers import set_seed
    from transformers.trainer_utils import SaveStrategy

    from tunelab.models import load_model
    from tunelab.models.peft import add_lora
    from tunelab.training.trainer import build_trainer

    if args.shape:
        model = shape_model(args, params, tokenizer.pad_token_id)
        if params.peft:
            set_seed(args.seed)  # as TRL does right before adding the adapter
            model = add_lora(model, params)
    else:
        set_seed(args.seed)
        model = load_model(source, params)
    trainer = build_trainer(model, tokenizer, params, rows, None, tempfile.mkdtemp(prefix="bench-tunelab-"))
    trainer.args.save_strategy = SaveStrategy.NO  # training_arguments always saves checkpoints
    return trainer


def build_trl(args: argparse.Namespace, params: Any, tokenizer: Any, source: Any, examples: list[Any]) -> Any:
    """Plain TRL SFTTrainer on the same examples, with tunelab's training arguments copied over."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from tunelab.models.load import load_causal_lm
    from tunelab.models.peft import lora_config
    from tunelab.training.trainer import training_arguments

    if args.shape:
        model = shape_model(args, params, tokenizer.pad_token_id)
    else:
        set_seed(args.seed)
        model = load_causal_lm(source, dtype=base_dtype(params))  # a GGUF file becomes a plain float model
        model.config.use_cache = False
    ref = training_arguments(params, tempfile.mkdtemp(prefix="bench-trl-"), 1, False)  # what tunelab would use
    config = SFTConfig(
        output_dir=ref.output_dir,
        learning_rate=ref.learning_rate,
        max_steps=ref.max_steps,
        num_train_epochs=ref.num_train_epochs,
        per_device_train_batch_size=ref.per_device_train_batch_size,
        gradient_accumulation_steps=ref.gradient_accumulation_steps,
        warmup_steps=ref.warmup_steps,
        optim=ref.optim,
        lr_scheduler_type=ref.lr_scheduler_type,
        weight_decay=ref.weight_decay,
        max_grad_norm=ref.max_grad_norm,
        seed=ref.seed,
        data_seed=ref.data_seed,
        bf16=bool(ref.bf16),  # set explicitly: SFTConfig defaults to bf16=True
        fp16=bool(ref.fp16),
        use_cpu=ref.use_cpu,  # bf16 on a CPU needs it, as tunelab's own arguments set it
        activation_checkpointing=args.gradient_checkpointing,  # SFTConfig defaults to checkpointing on
        # --defaults: TRL checkpoints every layer, as its users get it; otherwise the same layers as tunelab.
        activation_checkpointing_kwargs={"use_reentrant": False}
        if args.defaults
        else ref.activation_checkpointing_kwargs,
        logging_steps=1,
        logging_first_step=True,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=ref.dataloader_num_workers,
        dataloader_pin_memory=ref.dataloader_pin_memory,
        # SFT settings matching tunelab's sft method
        max_length=params.block_size,
        packing=params.packing,
        packing_strategy="bfd",  # padding-free when packed; unpacked batches are padded
        padding_free=False,
        completion_only_loss=params.completion_only_loss,  # labels are given, so TRL keeps them as they are
        assistant_only_loss=False,
        dataset_num_proc=None,
    )
    dataset = Dataset.from_dict({"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]})
    peft_config = lora_config(params) if params.peft else None
    if args.freeze_layers:  # the plain way: every parameter outside the last N layers off, in fp32 as loaded
        count = model.config.num_hidden_layers
        kept = tuple(f"model.layers.{i}." for i in range(count - args.freeze_layers, count))
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.startswith(kept))
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )
    if group_by_length(params) and not args.defaults:
        # tunelab batches examples of similar length (LengthGroupedSampler, seeded): give TRL the very same batch
        # order, so both sides train identical batches (TRL's own is train_sampling_strategy="group_by_length").
        import torch
        from transformers.trainer_pt_utils import LengthGroupedSampler

        lengths = [len(e) for e in examples]
        batch = config.train_batch_size * config.gradient_accumulation_steps
        trainer._get_train_sampler = lambda *_: LengthGroupedSampler(
            batch, lengths=lengths, generator=torch.Generator().manual_seed(config.seed)
        )
    return trainer


def group_by_length(params: Any) -> bool:
    """Whether tunelab batches examples of similar length (its default without packing)."""
    return bool(getattr(params, "group_by_length", False)) and not params.packing


# --------------------------------------------------------------------------- measuring


class Meter:
    """Times each optimizer step, counts the tokens of its batches, records the logged loss and peak memory.

    Batches are counted as the collator builds them (on CPU, no device sync) and consumed, in order, as
    `training_step` runs: the dataloader may build a batch ahead of the step that trains it.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.args = args
        self.cuda = torch.cuda.is_available()
        self.built: collections.deque[tuple[int, int, int]] = collections.deque()
        self.pending = [0, 0, 0]  # tokens, padded tokens, trained tokens of the step under way
        self.steps: dict[int, dict[str, float]] = {}
        self.losses: dict[int, float] = {}
        self.step_start = 0.0
        self.window_start: float | None = None
        self.window_end = 0.0
        self.peak = 0

    def attach(self, trainer: Any) -> None:
        from transformers import TrainerCallback

        meter = self
        collate = trainer.data_collator

        def counting_collator(features: list[Any]) -> dict[str, Any]:
            batch = collate(features)
            tokens = sum(_length(feature) for feature in features)  # what the batch holds before any padding
            trained = int((batch["labels"][..., 1:] != -100).sum())
            meter.built.append((tokens, batch["input_ids"].numel(), trained))
            return batch

        trainer.data_collator = counting_collator
        training_step = trainer.training_step

        def counted_training_step(*a: Any, **kw: Any) -> Any:
            for i, n in enumerate(meter.built.popleft()):
                meter.pending[i] += n
            return training_step(*a, **kw)

        trainer.training_step = counted_training_step

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):  # noqa: D102
                meter.reset_peak()

            def on_step_begin(self, args, state, control, **kwargs):  # noqa: D102
                meter.step_start = meter.now()
                if meter.window_start is None and meter.args.warmup_steps == 0:
                    meter.window_start = meter.step_start

            def on_step_end(self, args, state, control, **kwargs):  # noqa: D102
                meter.on_step_end(state.global_step)

            def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D102
                if logs and "loss" in logs:
                    meter.on_loss(state.global_step, float(logs["loss"]))

            def on_train_end(self, args, state, control, **kwargs):  # noqa: D102
                meter.read_peak()

        trainer.add_callback(Callback())

    def now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_end(self, step: int) -> None:
        end = self.now()
        tokens, padded, trained = self.pending
        self.pending = [0, 0, 0]
        self.steps[step] = {"time_s": end - self.step_start, "tokens": tokens, "padded": padded, "trained": trained}
        if step == self.args.warmup_steps:
            self.window_start = end
        self.window_end = end

    def on_loss(self, step: int, loss: float) -> None:
        self.losses[step] = loss
        s = self.steps.get(step, {})
        tag = " (warmup)" if step <= self.args.warmup_steps else ""
        print(
            f"[{self.args._side}] step {step}/{self.args.steps}  loss {loss:.4f}  {s.get('time_s', 0):.3f} s  "
            f"{s.get('tokens', 0)} tokens{tag}",
            flush=True,
        )

    def reset_peak(self) -> None:
        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return
        try:  # Linux: "5" resets the peak RSS (VmHWM) to the current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass  # the peak then covers the whole process, loading included

    def read_peak(self) -> None:
        if self.cuda:
            import torch

            self.peak = torch.cuda.max_memory_allocated()
            return
        self.peak = _vm_hwm() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def summary(self) -> dict[str, Any]:
        timed = {k: v for k, v in self.steps.items() if k > self.args.warmup_steps}
        wall = self.window_end - (self.window_start or self.window_end)
        tokens = sum(s["tokens"] for s in timed.values())
        trained = sum(s["trained"] for s in timed.values())
        padded = sum(s["padded"] for s in timed.values())
        return {
            "tokens_per_s": tokens / wall if wall > 0 else None,
            "trained_tokens_per_s": trained / wall if wall > 0 else None,
            "median_step_s": statistics.median(s["time_s"] for s in timed.values()) if timed else None,
            "timed_wall_s": wall,
            "timed_tokens": tokens,
            "padding_share": 1 - tokens / padded if padded else None,
            "peak_memory_bytes": self.peak,
            "memory_kind": "max allocated" if self.cuda else "peak RSS",
            "losses": {str(k): v for k, v in sorted(self.losses.items())},
            "steps": {str(k): v for k, v in sorted(self.steps.items())},
            "mfu": None,
        }


def _length(feature: Any) -> int:
    """Tokens of one dataset row: a TRL dict, a tunelab example, or a list of packed tunelab examples."""
    if isinstance(feature, dict):
        return len(feature["input_ids"])
    if isinstance(feature, list):
        return sum(len(example) for example in feature)
    return len(feature)


def _vm_hwm() -> int | None:
    """Peak resident set size of this process in bytes (Linux), since start or the last reset."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))  # the checkout's tunelab, installed or not
    sys.exit(main())
