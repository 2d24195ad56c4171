"""Benchmark data preparation: an N-row Alpaca file through tunelab's dry run and through TRL's SFTTrainer.

For each N (--rows, default 10k,100k,1M) the script writes an N-row Alpaca JSONL file (the rows of the shared Alpaca
sample, cycled, each instruction numbered so no two rows are alike), then runs, each in its own subprocess:

- tunelab cold: `tunelab.tasks.plan` (what `tunelab llm --dry-run --trainer sft` runs) with an empty prepared-data
  cache: read, check, render (the model's own chat template, as TRL uses), tokenize, cut into rows, cache;
- tunelab warm: the same dry run again, reusing the cache;
- trl cold: `datasets.load_dataset("json")` of the same file into an empty datasets cache, a `map` to TRL's
  conversational prompt/completion rows, and `trl.SFTTrainer(...)` built on it (a one-layer model, the same
  tokenizer and max_length), which prepares the dataset with its `datasets.map` tokenization (`dataset_num_proc`
  processes, --trl-num-proc, default the same as tunelab's);
- trl warm: the same again, `datasets` reusing its cached maps.

Printed per run: seconds of the data step (tunelab: preparing, or finding and opening the cached entry, as its
log line says; TRL: loading, mapping and SFTTrainer's preparation), of the dry run (tunelab: the whole `plan`,
model checks and tokenizer loading included; TRL: the same as its data step), and of the whole process (imports
included), rows/s and tokens/s of the data step, and peak RSS (the process's own, and the largest of its worker
processes). Run from the repository
root on an idle machine:

    PYTHONPATH=src .venv/bin/python bench/bench_data.py --rows 10000,100000,1000000
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SOURCES = (REPO.parent / "shared" / "data" / "alpaca" / "train.jsonl", REPO / "samples" / "alpaca.jsonl")


def write_rows(path: Path, count: int) -> None:
    source = next(p for p in SOURCES if p.is_file())
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    with open(path, "w", encoding="utf-8") as out:
        for index, row in zip(range(count), itertools.cycle(rows)):
            out.write(json.dumps({**row, "instruction": f"{row['instruction']} ({index})"}) + "\n")


def peak_rss_mib() -> tuple[float, float]:
    """(this process's peak RSS, the largest peak of its finished children), MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


def side_tunelab(file: Path, block_size: int, workdir: Path) -> dict:
    from tunelab.config.llm import LLMParams
    from tunelab.tasks import plan

    params = LLMParams(
        data_path=str(file),
        trainer="sft",
        block_size=block_size,
        chat_template="tokenizer",
        project_name=str(workdir / "project"),
    )
    started = time.perf_counter()
    result = plan(params)
    seconds = time.perf_counter() - started
    note = next(n for n in result.notes if n.startswith("prepared data"))
    # The data step's own time: preparing (cold) or finding and opening the entry (warm), as the note says.
    data_seconds = float(note.split(" in ")[1].split(" s")[0])
    examples = result.splits[0].examples
    tokens = int(sum(result.splits[0].lengths))
    return {"data_seconds": data_seconds, "seconds": seconds, "rows": examples, "tokens": tokens, "note": note}


def side_trl(file: Path, block_size: int, num_proc: int | None, workdir: Path) -> dict:
    import datasets
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    from tunelab.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(MODEL), 2048)
    started = time.perf_counter()
    data = datasets.load_dataset("json", data_files=str(file), split="train")

    def to_prompt_completion(row: dict) -> dict:
        user = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        return {
            "prompt": [{"role": "user", "content": user}],
            "completion": [{"role": "assistant", "content": row["output"]}],
        }

    data = data.map(to_prompt_completion, remove_columns=data.column_names, num_proc=num_proc)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    args = SFTConfig(
        output_dir=str(workdir / "trl-out"),
        max_length=block_size,
        dataset_num_proc=num_proc,
        report_to="none",
        use_cpu=True,
    )
    trainer = SFTTrainer(model=LlamaForCausalLM(config), args=args, train_dataset=data, processing_class=tokenizer)
    seconds = time.perf_counter() - started
    prepared = trainer.train_dataset
    tokens = sum(len(ids) for batch in prepared.iter(batch_size=10000) for ids in batch["input_ids"])
    return {"data_seconds": seconds, "seconds": seconds, "rows": len(prepared), "tokens": tokens}


def run_side(args: argparse.Namespace, side: str, file: Path, env: dict[str, str], workdir: Path) -> dict:
    command = [sys.executable, __file__, "--_side", side, "--_file", str(file), "--_workdir", str(workdir)]
    command += ["--block-size", str(args.block_size)]
    if args.trl_num_proc:
        command += ["--trl-num-proc", str(args.trl_num_proc)]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{side} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_seconds"] = wall
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="10000,100000,1000000", help="comma-separated row counts")
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--sides", default="tunelab,trl")
    parser.add_argument("--trl-num-proc", type=int, default=None, help="TRL's dataset_num_proc (default: tunelab's)")
    parser.add_argument("--keep", default=None, help="folder for the data files and caches (default: a temp one)")
    parser.add_argument("--_side", help=argparse.SUPPRESS)
    parser.add_argument("--_file", help=argparse.SUPPRESS)
    parser.add_argument("--_workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._side:
        workdir, file = Path(args._workdir), Path(args._file)
        if args._side == "tunelab":
            result = side_tunelab(file, args.block_size, workdir)
        else:
            from tunelab.data.pipeline import worker_count

            procs = args.trl_num_proc or worker_count(None, file.stat().st_size)
            result = side_trl(file, args.block_size, procs if procs > 1 else None, workdir)
            result["num_proc"] = procs
        result["rss_mib"], result["worker_rss_mib"] = peak_rss_mib()
        print(json.dumps(result))
        return

    root = Path(args.keep or tempfile.mkdtemp(prefix="tunelab-bench-data-"))
    root.mkdir(parents=True, exist_ok=True)
    print("| rows | run | data s | dry run s | process s | rows/s | tokens/s | peak RSS MiB (main / workers) |")
    print("|---:|---|---:|---:|---:|---:|---:|---|")
    results = []
    for count in [int(n) for n in args.rows.split(",")]:
        file = root / f"alpaca-{count}.jsonl"
        if not file.is_file():
            write_rows(file, count)
        for side in args.sides.split(","):
            workdir = root / f"{side}-{count}"
            shutil.rmtree(workdir, ignore_errors=True)
            workdir.mkdir()
            env = {**os.environ, "TUNELAB_DATA_CACHE": str(workdir / "cache"), "HF_HUB_OFFLINE": "1"}
            env["HF_DATASETS_CACHE"] = str(workdir / "datasets-cache")
            env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
            for run in ("cold", "warm"):
                result = run_side(args, side, file, env, workdir)
                result.update(rows_in_file=count, side=side, run=run)
                results.append(result)
                rate = result["rows"] / max(result["data_seconds"], 0.01)
                tokens = result["tokens"] / max(result["data_seconds"], 0.01)
                print(
                    f"| {count:,} | {side} {run} | {result['data_seconds']:.2f} | {result['seconds']:.1f} | "
                    f"{result['process_seconds']:.1f} | "
                    f"{rate:,.0f} | {tokens:,.0f} | {result['rss_mib']:,.0f} / {result['worker_rss_mib']:,.0f} |",
                    flush=True,
                )
            shutil.rmtree(workdir, ignore_errors=True)
    (root / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    print(f"\nevery figure: {root / 'results.json'}")


if __name__ == "__main__":
    main()
