"""Checkpoints a run can be trusted to resume from.

transformers' Trainer writes `checkpoint-N/` file by file, and with several processes each writes its own part (its
random state; under FSDP or DeepSpeed its shards), so a crash mid-write leaves a folder that looks like a checkpoint
but is not. tunelab marks a checkpoint complete only after every process has written its part and every file is on
disk (fsync), and deletes older checkpoints only after that. The mark lists the files and the number of processes;
resuming takes the newest checkpoint whose mark is there and whose files all are, and ignores the rest. So a crash
at any moment leaves at least the previous checkpoint whole.

Each checkpoint also holds the run's totals so far (`Progress`: the summed loss of every step, the seconds trained,
the tokens trained, the evaluations' reports), so a resumed run's final figures cover the whole run, not only the
part after the resume.

A resumed run must be the same run: the parameters it was started with are kept in the staging folder and
compared before anything is loaded.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tunelab.config.base import RunParams
from tunelab.errors import TunelabError

log = logging.getLogger("tunelab")

COMPLETE_MARK = "tunelab_checkpoint_complete"
PROGRESS_FILE = "tunelab_progress.json"  # in each checkpoint: the run's totals up to it (Progress)
PARAMS_FILE = "run_params.json"
DATA_FILE = "run_data.json"  # the sha256 of the data an unfinished run trains on (data/cache.data_fingerprint)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_RANK_FILE = re.compile(r"^rng_state_(\d+)\.pth$")  # transformers' random state of one process of several
_REPORTED: set[Path] = set()  # checkpoints marked complete but found lacking, said once per process

# Parameters that may differ between a run and its resumption: where results go and how they are logged, not
# what is trained.
RESUMABLE_CHANGES = frozenset(
    {"resume", "token", "push_to_hub", "username", "repo_id", "log", "logging_steps", "save_total_limit", "save_steps"}
    | {"merge_adapter", "bad_rows", "main_process_ip", "main_process_port", "machine_rank"}
    # Checkpointing changes what is kept for the backward pass, not the maths (dropout masks are replayed), and
    # auto may choose differently on a machine with other free memory.
    | {"gradient_checkpointing", "disable_gradient_checkpointing", "checkpoint_every"}
)


def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint-N folder, oldest first, complete or not."""
    found = []
    for path in folder.iterdir() if folder.is_dir() else ():
        match = _CHECKPOINT.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def is_complete(checkpoint: Path) -> bool:
    return not missing(checkpoint)


def missing(checkpoint: Path) -> list[str]:
    """What keeps a checkpoint from being resumed from: [] when it is complete, else what is wrong (no mark: a crash
    while it was written; a file its mark lists that is gone or of another size; a process's random state absent)."""
    mark = checkpoint / COMPLETE_MARK
    if not mark.is_file():
        return ["it has no completeness mark"]
    try:
        record = json.loads(mark.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        record = None
    if not isinstance(record, dict):
        return []  # an older tunelab's mark (the word "complete"): trusted as it was then
    world_size = int(record.get("world_size", 1))
    expected: dict[str, int | None] = dict(record.get("files", {}))
    if world_size > 1:  # each process's own file, whether or not the main process saw it when it marked
        for rank in range(world_size):
            expected.setdefault(f"rng_state_{rank}.pth", None)
    lacking = []
    for name, size in expected.items():
        path = checkpoint / name
        what = _RANK_FILE.match(name)
        shown = f"{name} (the random state of process {what.group(1)} of {world_size})" if what else name
        if not path.is_file():
            lacking.append(f"{shown} is missing")
        elif size is not None and path.stat().st_size != size:
            lacking.append(f"{shown} has {path.stat().st_size} bytes, not the {size} it was written with")
    return lacking


def last_complete_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint; one marked complete but lacking a file is passed over, and said why."""
    for _, path in reversed(checkpoints(folder)):
        lacking = missing(path)
        if not lacking:
            return path
        if (path / COMPLETE_MARK).is_file() and path not in _REPORTED:
            _REPORTED.add(path)
            several = any("random state of process" in reason for reason in lacking)
            log.warning(
                "%s is marked complete but %s: not resumed from%s",
                path.name,
                "; ".join(lacking),
                " (with several machines, the run folder must be on a disk all of them write to)" if several else "",
            )
    return None


def mark_complete(checkpoint: Path, world_size: int = 1) -> None:
    """Flush every file of the checkpoint to disk, then write the mark (itself atomically): the number of processes
    that wrote the checkpoint and each file with its size, which `missing` checks before a resume trusts it.

    Call it once every process has written its part (GuardedTrainer waits for all of them first).
    """
    files = {}
    for path in sorted(checkpoint.rglob("*")):
        if path.is_file() and not path.name.startswith(f".{COMPLETE_MARK}"):
            with path.open("rb") as f:
                os.fsync(f.fileno())
            files[path.relative_to(checkpoint).as_posix()] = path.stat().st_size
    tmp = checkpoint / f".{COMPLETE_MARK}.tmp"
    tmp.write_text(json.dumps({"world_size": world_size, "files": files}, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, checkpoint / COMPLETE_MARK)


@dataclass
class Progress:
    """A run's totals up to a checkpoint, over every part it took (a run resumed twice is three parts)."""

    step: int = 0
    train_runtime: float = 0.0  # seconds of training up to the checkpoint (what a crash threw away after it: not)
    loss_sum: float = 0.0  # every step's loss (averaged over the processes, as transformers logs it), summed
    trained_tokens: int = 0  # tokens the loss was computed on, all processes (where the trainer counts them)
    evaluations: list[dict[str, Any]] = field(default_factory=list)  # the task's report of each evaluation


def write_progress(checkpoint: Path, progress: Progress) -> None:
    tmp = checkpoint / f".{PROGRESS_FILE}.tmp"
    tmp.write_text(json.dumps(asdict(progress), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, checkpoint / PROGRESS_FILE)


def read_progress(checkpoint: Path) -> Progress | None:
    """The totals a checkpoint holds; None for one written by an older tunelab (it kept none)."""
    path = checkpoint / PROGRESS_FILE
    if not path.is_file():
        return None
    saved = json.loads(path.read_text(encoding="utf-8"))
    return Progress(**{f.name: saved[f.name] for f in fields(Progress) if f.name in saved})


def prune(folder: Path, keep: int, protect: str | None = None) -> None:
    """Keep the newest `keep` complete checkpoints (and `protect`, the best one when early stopping tracks it);
    delete older ones and any incomplete ones older than the newest complete checkpoint. Marked counts as complete
    here: on several machines without a shared disk this one never sees the others' random states, and its
    checkpoints must not pile up for it (resume still checks them whole)."""
    complete = [path for _, path in checkpoints(folder) if (path / COMPLETE_MARK).is_file()]
    if not complete:
        return
    newest = complete[-1]
    kept = set(complete[-keep:])
    if protect:
        kept.add(Path(protect))
    for step, path in checkpoints(folder):
        if path in kept or step > step_of(newest):
            continue  # a newer incomplete one may be being written right now
        shutil.rmtree(path, ignore_errors=True)


def drop_incomplete(folder: Path) -> list[str]:
    """Remove checkpoints a crash left half-written; return their names (for the log)."""
    dropped = []
    for _, path in checkpoints(folder):
        if not is_complete(path):
            shutil.rmtree(path, ignore_errors=True)
            dropped.append(path.name)
    return dropped


def check_same_run(folder: Path, params: RunParams) -> None:
    """Refuse to resume a run that was started with different training parameters."""
    saved_file = folder / PARAMS_FILE
    if not saved_file.is_file():
        return
    saved = json.loads(saved_file.read_text(encoding="utf-8"))
    now = params.to_dict(redact=True)
    changed = [
        f"{name}: {saved.get(name)!r} then, {now.get(name)!r} now"
        for name in sorted(set(saved) | set(now))
        if name not in RESUMABLE_CHANGES and saved.get(name) != now.get(name)
    ]
    if changed:
        raise TunelabError(
            f"{folder} holds an interrupted run with other parameters ({'; '.join(changed)}): run again with the same "
            "parameters to resume it, or with --resume false to discard it and start over"
        )


def check_same_data(folder: Path, fingerprint: str | None) -> None:
    """Refuse to resume a run whose data files, or chat template files, changed since it started (the checkpoint's
    position in the data and its optimizer state belong to the old rows)."""
    saved_file = folder / DATA_FILE
    if fingerprint is None or not saved_file.is_file():
        return
    saved = json.loads(saved_file.read_text(encoding="utf-8")).get("sha256")
    if saved != fingerprint:
        raise TunelabError(
            f"{folder} holds an interrupted run of other data: its data files or chat template file changed since it "
            "started. Run with the data it started with to resume it, or with --resume false to discard it and start "
            "over"
        )


# The per-step logs of a run folder (JSON lines with a "step"): the metrics, and grpo's sample completions.
STEP_LOGS = ("metrics.jsonl", "completions.jsonl")


def trim_step_logs(folder: Path, last_step: int) -> None:
    """Every per-step log of a run resumed from `last_step`, trimmed to it."""
    for name in STEP_LOGS:
        trim_metrics(folder / name, last_step)


def trim_metrics(metrics_file: Path, last_step: int) -> None:
    """Drop the lines an interrupted run logged after its last checkpoint (they will be logged again), and a line
    the interruption cut short."""
    if not metrics_file.is_file():
        return
    kept = []
    for line in metrics_file.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:  # half-written when the run was killed (or the disk filled)
            continue
        if isinstance(record, dict) and record.get("step", 0) <= last_step:
            kept.append(line)
    tmp = metrics_file.with_name(metrics_file.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, metrics_file)


def step_of(checkpoint: Path) -> int:
    return int(_CHECKPOINT.match(checkpoint.name).group(1))


def check_disk_space(folder: Path, needed: int, what: str) -> None:
    """Stop with a clear message (the last checkpoint kept) rather than die half-way through writing one."""
    probe = folder if folder.exists() else folder.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise TunelabError(
            f"not enough disk space for {what}: {needed / 2**30:.2f} GiB needed, {free / 2**30:.2f} GiB free "
            f"on the disk of {probe}; free some space (or set project_name to a bigger disk) and run again to resume"
        )


def checkpoint_bytes(model: Any, full_weights: bool, copies: int = 1) -> int:
    """About what one checkpoint takes: the saved weights (trainable ones, or all of them without LoRA; `copies`
    of them: 2 with dpo's synced reference beside the model), plus AdamW's two fp32 states per trainable
    parameter; 10% and 64 MiB of headroom for the rest."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) if full_weights else trainable * 4
    return int((weights * copies + trainable * 8) * 1.1) + 64 * 2**20
