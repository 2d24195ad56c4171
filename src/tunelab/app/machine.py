"""What the machine has to give while a job runs, for the app's pages: the device, its memory, the RAM, the disk
where runs are written, and the running job's peak memory so far (from its metrics.jsonl).

The pages poll this every few seconds, so each figure is a cheap read: a /proc file, one statvfs, the tail of one
file. torch is never imported here (seconds and hundreds of MB); it is asked only when this process has already
imported it, and the GPU's memory only when this process already holds a CUDA context (the chat box's model),
since asking would otherwise create one, which keeps a few hundred MB of the GPU from the training job.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from tunelab.app.worker import run_folder, staging_folder

METRICS_TAIL = 64 * 1024  # bytes of metrics.jsonl read from its end: many records, never the whole file


def machine_status(data_dir: Path, running_job_folder: Path | None = None) -> dict[str, Any]:
    """The machine's figures, in bytes (None where this process cannot tell cheaply).

    Args:
        data_dir: The app's folder; the disk figures are those of the file system the runs are written to.
        running_job_folder: The folder of the job now training, for its peak memory.

    Returns:
        device (in words), accelerator_used_bytes and accelerator_total_bytes, ram_total_bytes and
        ram_available_bytes, disk_free_bytes and disk_total_bytes, peak_memory_gib (the latest the running job
        logged: accelerator memory on a GPU, resident memory on CPU; None when it logged none yet).
    """
    device, used, total = _accelerator()
    ram_total, ram_available = _ram()
    disk = shutil.disk_usage(_existing(Path(data_dir)))
    return {
        "device": device,
        "accelerator_used_bytes": used,
        "accelerator_total_bytes": total,
        "ram_total_bytes": ram_total,
        "ram_available_bytes": ram_available,
        "disk_free_bytes": disk.free,
        "disk_total_bytes": disk.total,
        "peak_memory_gib": peak_memory_gib(running_job_folder) if running_job_folder else None,
    }


def human_bytes(n: float | None) -> str:
    """A byte count for people: "512 B", "12.3 GiB" ("" for None, so a template can pass whatever it has)."""
    if n is None:
        return ""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    step = 0
    while abs(n) >= 1024 and step < len(units) - 1:
        n, step = n / 1024, step + 1
    return f"{n:.0f} B" if step == 0 else f"{n:.1f} {units[step]}"


def peak_memory_gib(job_folder: Path) -> float | None:
    """The latest `peak_memory_gib` in a job's metrics.jsonl (staging folder while it trains, run folder after)."""
    job = {"folder": job_folder}
    for folder in (staging_folder(job), run_folder(job)):
        path = folder / "metrics.jsonl"
        try:
            with path.open("rb") as f:
                f.seek(max(0, path.stat().st_size - METRICS_TAIL))
                lines = f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            continue
        for line in reversed(lines):
            if "peak_memory_gib" not in line:
                continue
            try:
                value = json.loads(line).get("peak_memory_gib")
            except (json.JSONDecodeError, AttributeError):  # the line being written, or one cut by the seek
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        return None
    return None


def _accelerator() -> tuple[str, int | None, int | None]:
    """(device in words, accelerator bytes used, total); the memory is None where it would cost to ask."""
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_initialized():  # this process holds a context already: asking costs nothing more
                free, total = torch.cuda.mem_get_info(0)
                return torch.cuda.get_device_name(0), int(total - free), int(total)
            if torch.cuda.is_available():
                return _nvidia_name() or "CUDA GPU", None, None
            mps = getattr(torch.backends, "mps", None)
            if mps is not None and mps.is_available():
                return "Apple GPU (MPS)", None, None  # unified memory: the RAM figures are its figures
        except RuntimeError:  # a driver that went away: show what the CPU side knows
            pass
        return _cpu(), None, None
    # Without torch in this process, the NVIDIA driver's own file names the GPU the job will train on (Linux).
    return _nvidia_name() or _cpu(), None, None


@functools.cache
def _nvidia_name() -> str | None:
    for path in sorted(glob.glob("/proc/driver/nvidia/gpus/*/information")):
        try:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.startswith("Model:"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            continue
    return None


def _cpu() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return f"CPU ({cores} core{'s' if cores != 1 else ''})"


def _ram() -> tuple[int | None, int | None]:
    """(total, available) RAM: MemAvailable counts the page cache the kernel would give back, MemFree does not."""
    found: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    found[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if len(found) == 2:
        return found["MemTotal"], found["MemAvailable"]
    try:  # macOS and other systems without /proc
        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
    except (ValueError, OSError, AttributeError):
        return None, None
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * page
    except (ValueError, OSError):
        available = None
    return total, available


def _existing(path: Path) -> Path:
    """The path, or its nearest folder that exists (the app's folder is made at start, but be safe)."""
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
