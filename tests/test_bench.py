"""bench/bench_sft.py, the issue's benchmark, runs end to end: both sides, one table, the same first loss."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import needs_shared

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [["--peft"], ["--no-peft", "--packing"], ["--peft", "--bf16"]],
    ids=["lora", "full-packed", "lora-bf16"],  # bf16: as bench/gpu.sh runs every job
)
def test_benchmark_runs_both_sides_and_prints_the_table(extra, tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, str(ROOT / "bench" / "bench_sft.py"), "--shape", "tiny", "--data"]
    command += [str(ROOT / "samples" / "alpaca.jsonl"), "--block-size", "64", "--batch-size", "2", "--steps", "4"]
    command += ["--warmup-steps", "1", *extra, "--out", str(out)]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "| tokens/s (non-pad) |" in result.stdout and "tunelab/TRL" in result.stdout
    report = json.loads(out.read_text())
    tunelab, trl = report["results"]["tunelab"], report["results"]["trl"]
    assert tunelab["tokens_per_s"] > 0 and trl["tokens_per_s"] > 0 and report["ratios"]["tokens_per_s"] > 0
    assert tunelab["peak_memory_bytes"] > 0 and trl["peak_memory_bytes"] > 0
    assert tunelab["trainable_params"] == trl["trainable_params"]
    # Unpacked, both sides train the very same first batch from the same weights; packed, TRL packs its own way.
    first = tunelab["losses"]["1"], trl["losses"]["1"]
    tolerance = 0.05 if "--packing" in extra else 1e-2 if "--bf16" in extra else 1e-4
    assert first[0] == pytest.approx(first[1], rel=tolerance)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["memory_breakdown.py", "profile_step.py"])
def test_memory_breakdown_and_step_profile_run(script, tmp_path):
    command = [sys.executable, str(ROOT / "bench" / script), "--shape", "tiny", "--data"]
    command += [str(ROOT / "samples" / "alpaca.jsonl"), "--block-size", "64", "--batch-size", "2", "--steps", "4"]
    command += ["--warmup-steps", "2"]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    if script == "memory_breakdown.py":
        assert "training peak (4 steps)" in result.stdout and "heap: in use" in result.stdout
    else:
        assert "| matmul |" in result.stdout and "GFLOP/s" in result.stdout


@pytest.mark.slow
def test_peers_benchmark_runs_tunelab_and_reports_missing_peers(tiny_llama, tmp_path):
    """The script's plumbing (each tool's command, the timing, the table), on a tiny model: its figures are the job's
    on SmolLM2 (docs/benchmarks.md), not a test's."""
    out = tmp_path / "peers.json"
    command = [sys.executable, str(ROOT / "bench" / "bench_peers.py"), "--steps", "2", "--rows", "12", "--data"]
    command += [str(ROOT / "samples" / "alpaca.jsonl"), "--model", str(tiny_llama)]
    command += ["--tools", "tunelab,llamafactory", "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PEERS_DIR": str(tmp_path / "no-peers")}
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["tunelab"]["train_s"] > 0 and report["tunelab"]["peak_rss_gib"] > 0.1
    assert report["tunelab"]["checkpointing"].startswith("off")  # auto, with this machine's RAM
    assert "not found" in report["llamafactory"]["missing"]
    assert "| tunelab |" in result.stdout


@pytest.mark.slow
@needs_shared()
def test_classification_benchmark_runs_both_recipes(tiny_llama, tmp_path):
    """bench_classification.py on a few rows of the second set: both recipes train, are scored on the held-out
    split with the same predictor, and the table compares them (on the tiny model: the figures are SmolLM2's, in
    docs/benchmarks.md)."""
    out = tmp_path / "classification.json"
    command = [sys.executable, str(ROOT / "bench" / "bench_classification.py"), "--data", "requests"]
    command += ["--base-model", str(tiny_llama)]
    command += ["--train-rows", "16", "--eval-rows", "12", "--work", str(tmp_path / "work"), "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())["results"]
    for side in ("tutorial", "tunelab"):
        assert report[side]["train_s"] > 0 and 0 <= report[side]["accuracy"] <= 1, report[side]
        assert 0 <= report[side]["macro_f1"] <= 1 and report[side]["peak_rss_gib"] > 0.1
    assert "| tutorial |" in result.stdout and "| tunelab |" in result.stdout and "tunelab - tutorial" in result.stdout


def test_flops_per_token_counts_the_batches_training_draws():
    """The job's FLOPs per token are counted on the batches in the order training draws them: the dataset's own
    order pads short rows to their long neighbours, and counted that padding as the job's work (0.742 against
    0.532 GFLOP per token on the SmolLM2 job, which made 65% of the matmul peak read as 96%)."""
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    import bench_sft

    width = 8
    lengths = [4, 32] * 4  # the dataset interleaves short and long rows; the sampler pairs rows of one length

    class Trainer:
        model = torch.nn.Linear(width, width, bias=False)
        train_dataset = [torch.ones(n, width) for n in lengths]
        args = type("Args", (), {"per_device_train_batch_size": 2})()

        def _get_train_sampler(self):
            return sorted(range(len(lengths)), key=lambda i: lengths[i])

        def data_collator(self, rows):
            longest = max(len(r) for r in rows)
            return torch.stack([torch.cat([r, r.new_zeros(longest - len(r), width)]) for r in rows])

        def _prepare_inputs(self, batch):
            return batch

        def compute_loss(self, model, batch):
            return model(batch).sum()

    # A linear layer's forward and backward cost 2 * width^2 FLOPs per position each way (the input needs no
    # gradient); grouped, the batches hold no padding, so that is the cost per token.
    per_token = bench_sft.flops_per_token(Trainer(), batches=4)
    assert per_token == pytest.approx(2 * 2 * width * width)


@pytest.mark.slow
def test_distill_benchmark_runs_both_ways_to_the_same_loss(tiny_llama, tmp_path):
    """bench_distill.py on the tiny model: both ways print a row, with the same loss (the chunks change how, not
    what, is computed)."""
    command = [sys.executable, str(ROOT / "bench" / "bench_distill.py"), "--model", str(tiny_llama)]
    command += ["--length", "32", "--steps", "1", "--beta", "0.5"]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = [line.split("|") for line in result.stdout.splitlines() if line.startswith(("| chunks", "| full"))]
    assert len(rows) == 2
    assert float(rows[0][4]) == pytest.approx(float(rows[1][4]), rel=1e-5)


def test_wpo_benchmark_prints_its_three_ways(tiny_llama, tmp_path):
    """bench_wpo.py on the tiny model: the policy pass alone, with WPO's chunked normaliser, and with the one from
    full logits, each a row with its time and peak."""
    command = [sys.executable, str(ROOT / "bench" / "bench_wpo.py"), "--model", str(tiny_llama)]
    command += ["--length", "32", "--steps", "1"]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = [line.split("|") for line in result.stdout.splitlines() if line.startswith(("| policy log", "| with"))]
    assert len(rows) == 3 and all(float(row[2]) > 0 and float(row[3].replace(",", "")) > 0 for row in rows)
