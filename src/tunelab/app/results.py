"""What a job page reads from a job's folder: the log tail, the metrics (live from the staging folder while the
run trains, from the run folder after), a grpo run's sample completions, the final metrics and evaluation
report, and the run folder as a zip.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunelab.app.worker import LOG_FILE, run_folder, staging_folder

LOG_CHUNK = 64 * 1024  # most bytes of log one poll returns
MAX_POINTS = 2000  # metric records one poll returns (the latest)


def log_tail(job: dict[str, Any], offset: int) -> tuple[str, int]:
    """(new log text from `offset`, the offset to ask from next time). A negative offset starts near the end."""
    path = Path(job["folder"]) / LOG_FILE
    if not path.is_file():
        return "", 0
    size = path.stat().st_size
    if offset < 0 or offset > size:
        offset = max(0, size - LOG_CHUNK)
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read(LOG_CHUNK)
    # Progress bars rewrite their line with \r; the page shows lines, so keep the last state of each.
    text = data.decode("utf-8", "replace").replace("\r\n", "\n")
    text = "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))
    return text, offset + len(data)


def _jsonl_tail(job: dict[str, Any], name: str, limit: int) -> list[dict[str, Any]]:
    """The last `limit` records of a run file (staging folder while training, run folder once finished)."""
    for folder in (run_folder(job), staging_folder(job)):
        path = folder / name
        if path.is_file():
            records = []
            for line in path.read_text(encoding="utf-8").splitlines()[-limit:]:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:  # the line being written right now
                    continue
            return records
    return []


def metric_records(job: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's metrics.jsonl records so far."""
    return _jsonl_tail(job, "metrics.jsonl", MAX_POINTS)


def sample_completions(job: dict[str, Any], limit: int = 20) -> list[dict[str, Any]]:
    """A grpo run's completions.jsonl samples, newest first."""
    return _jsonl_tail(job, "completions.jsonl", limit)[::-1]


def loss_points(records: list[dict[str, Any]]) -> dict[str, list[list[float]]]:
    """[step, value] pairs of the training and evaluation loss, for the chart."""
    return {
        "loss": [[r["step"], r["loss"]] for r in records if "loss" in r and "step" in r],
        "eval_loss": [[r["step"], r["eval_loss"]] for r in records if "eval_loss" in r and "step" in r],
    }


def final_metrics(job: dict[str, Any]) -> dict[str, Any]:
    return _json(run_folder(job) / "metrics.json")


def evaluation(job: dict[str, Any]) -> dict[str, Any] | None:
    """The `tunelab evaluate` report of a finished run, when there is one."""
    folder = run_folder(job) / "evaluation"
    if not (folder / "report.md").is_file():
        return None
    return {
        "report": (folder / "report.md").read_text(encoding="utf-8"),
        "results": _json(folder / "results.json"),
        "has_curves": (folder / "loss_curves.png").is_file(),
    }


def zip_stream(folder: Path) -> Iterator[bytes]:
    """The folder as a zip archive, produced piece by piece (nothing is built in memory or on disk whole)."""
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for root, dirs, files in os.walk(folder):
            dirs.sort()
            for name in sorted(files):
                path = Path(root) / name
                if path.is_symlink():
                    continue
                with path.open("rb") as src, archive.open(str(path.relative_to(folder)), "w") as dst:
                    while chunk := src.read(1024 * 1024):
                        dst.write(chunk)
                        yield sink.take()
                yield sink.take()
    yield sink.take()


class _Sink:
    """A write-only, non-seekable file for ZipFile (it then writes data descriptors instead of seeking back)."""

    def __init__(self) -> None:
        self._pieces: list[bytes] = []
        self._written = 0

    def write(self, data: bytes) -> int:
        self._pieces.append(bytes(data))
        self._written += len(data)
        return len(data)

    def tell(self) -> int:
        return self._written

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        data, self._pieces = b"".join(self._pieces), []
        return data


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
