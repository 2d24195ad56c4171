"""What a job page reads from a job's folder: the log tail (its long paths shortened), the metrics (live from the
staging folder while the run trains, from the run folder after), a grpo run's sample completions, the final
metrics with readable labels, the evaluation report, and the run folder as a zip.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import site
import sysconfig
import zipfile
from collections.abc import Callable, Iterator
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
    return shown_log(text, Path(job["folder"])), offset + len(data)  # the offset counts the file's bytes


def shown_log(text: str, job_folder: Path) -> str:
    """Log text with its long paths shortened for reading: the job's folder as `.` (`./run`, `./.run.partial`),
    an installed package's `/.../site-packages/` as `site-packages/`."""
    for spelling in _spellings(job_folder):
        # Not followed by a name character: jobs/ab12 must not shorten jobs/ab123.
        text = re.sub(re.escape(spelling) + r"(?![\w.-])", ".", text)
    for prefix in _package_folders():
        text = text.replace(prefix + os.sep, Path(prefix).name + "/")
    # Another interpreter's packages (a different venv): a whole path ending in site-packages, from where it starts.
    return re.sub(r"(?<![^\s'\"(=\[])(?:/[^\s/'\"]+)+/((?:site|dist)-packages/)", r"\1", text)


def _spellings(folder: Path) -> list[str]:
    """The ways a log may name the folder: as the job knows it and with links resolved; longest first."""
    names = {os.path.abspath(folder), os.path.realpath(folder)}
    return sorted((n for n in names if n != os.sep), key=len, reverse=True)


@functools.cache
def _package_folders() -> list[str]:
    """This interpreter's site-packages folders (the job runs on the same one); named exactly, so a path with
    spaces in it is shortened too."""
    folders = {sysconfig.get_paths().get(key) for key in ("purelib", "platlib")}
    folders.update(getattr(site, "getsitepackages", list)())
    folders.add(site.getusersitepackages())
    return sorted((f for f in folders if f and f.endswith("-packages")), key=len, reverse=True)


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
    """A grpo or rloo run's completions.jsonl samples, newest first."""
    return _jsonl_tail(job, "completions.jsonl", limit)[::-1]


def loss_points(records: list[dict[str, Any]]) -> dict[str, list[list[float]]]:
    """[step, value] pairs of the training and evaluation loss, for the chart."""
    return {
        "loss": [[r["step"], r["loss"]] for r in records if "loss" in r and "step" in r],
        "eval_loss": [[r["step"], r["eval_loss"]] for r in records if "eval_loss" in r and "step" in r],
    }


def final_metrics(job: dict[str, Any]) -> dict[str, Any]:
    return _json(run_folder(job) / "metrics.json")


def shown_metrics(metrics: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(key, label, value as shown) of a run's metrics.json: how well it learned first (losses, accuracy, a
    preference or grpo run's rewards), then how long and how fast, then any other key as it is named. Trainer
    bookkeeping (total_flos) is left out."""
    shown = []
    for key, value in metrics.items():
        if key in HIDDEN_METRICS:
            continue
        rank, label, show = _metric(key)
        shown.append((rank, key, label, show(value) if _is_number(value) else str(value)))
    return [(key, label, value) for _, key, label, value in sorted(shown)]


HIDDEN_METRICS = {"total_flos"}  # floating-point operations counted by the Trainer: no help in judging a run


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    return f"{minutes // 60} h {minutes % 60} min"


def _plain(value: float) -> str:
    if isinstance(value, int) or (math.isfinite(value) and value.is_integer() and abs(value) < 1e15):
        return f"{int(value):,}"
    return f"{value:,.0f}" if abs(value) >= 10_000 else f"{value:.4g}"


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _gib(value: float) -> str:
    return f"{value:.1f} GiB"


# Known keys in the order shown; the eval_ twin of a training figure comes right after it. A preference run
# logs TRL's rewards/* and logps/* names (methods/preference.py, kto.py), a reward model accuracy, margin and
# mean_reward (methods/reward.py), a grpo run reward, reward_std, rewards/<function>/mean|std and kl
# (methods/sampling.py, grpo.py); the final training log lands in metrics.json unprefixed.
_QUALITY: list[tuple[str, str, Callable[[float], str]]] = [
    ("loss", "loss", _plain),
    ("accuracy", "accuracy", _percent),
    ("macro_f1", "macro F1", _plain),
    ("perplexity", "perplexity", _plain),
    ("rewards/margins", "reward margin", _plain),
    ("rewards/accuracies", "reward accuracy", _percent),
    ("rewards/chosen", "reward of chosen", _plain),
    ("rewards/rejected", "reward of rejected", _plain),
    ("logps/chosen", "log-prob of chosen", _plain),
    ("logps/rejected", "log-prob of rejected", _plain),
    ("margin", "reward margin", _plain),  # a reward model's: score of chosen - score of rejected
    ("mean_reward", "mean reward", _plain),
    ("reward", "reward", _plain),
    ("reward_std", "reward std", _plain),
    ("rewards/*", "reward", _plain),  # grpo's per-function figures, see _metric
    ("kl", "KL to the reference", _plain),
]
_SPEED: list[tuple[str, str, Callable[[float], str]]] = [
    ("train_runtime", "training time", _duration),
    ("train_samples_per_second", "samples/s", _plain),
    ("train_steps_per_second", "steps/s", _plain),
    ("trained_tokens", "trained tokens", _plain),
    ("trained_tokens_per_second", "tokens/s", _plain),
    ("epoch", "epochs", _plain),
    ("peak_memory_gib", "peak memory", _gib),
    ("eval_runtime", "evaluation time", _duration),
    ("eval_samples_per_second", "eval samples/s", _plain),
    ("eval_steps_per_second", "eval steps/s", _plain),
]


def _metric(key: str) -> tuple[tuple[int, int, str], str, Callable[[float], str]]:
    """(sort rank, label, formatter) of a metrics.json key."""
    for index, (name, label, show) in enumerate(_SPEED):
        if key == name:
            return (1, index, ""), label, show
    evaluated = key.startswith("eval_")
    name = key.removeprefix("eval_").removeprefix("train_")
    prefix = "eval " if evaluated else ("training " if name == "loss" else "")
    per_function = re.fullmatch(r"rewards/(.+)/(mean|std)", name)
    for index, (known, label, show) in enumerate(_QUALITY):
        if name == known:
            return (0, 2 * index + evaluated, ""), prefix + label, show
        if known == "rewards/*" and per_function:
            label = f"{label} {per_function.group(1)} ({per_function.group(2)})"
            return (0, 2 * index + evaluated, key), prefix + label, show
    return (2, 0, key), key.replace("_", " "), _plain


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
