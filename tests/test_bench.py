"""bench/bench_sft.py, the issue's benchmark, runs end to end: both sides, one table, the same first loss."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--peft"], ["--no-peft", "--packing"]], ids=["lora", "full-packed"])
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
    assert first[0] == pytest.approx(first[1], rel=1e-4 if "--packing" not in extra else 0.05)
