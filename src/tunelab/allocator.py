"""The memory allocator of a CPU training run: tcmalloc (else jemalloc) when the machine has one. A leaf.

On a CPU every activation and temporary of the training step is a malloc'd block, and glibc's allocator serves
them badly: small long-lived blocks (tensor headers, autograd nodes) land between the big ones, the holes the big
ones leave no longer fit the next step's slightly different sizes, and the heap grows. Measured on SmolLM2-135M
with LoRA (docs/benchmarks.md, bench/memory_breakdown.py): at the peak glibc held 1.1 GiB free inside the heap
beside 1.1 GiB in use, and with gradient checkpointing on, 1.6 GiB free for at most 0.45 GiB ever in use at once.
Giving memory back instead (a lower mmap threshold, malloc_trim) costs more than it saves: fresh pages cost ~1.6 us
each to fault in on this project's machines, and the steps took twice as long. tcmalloc keeps blocks by size
class; preloaded, the same run peaks at 2.0 GiB instead of 3.0, and trains a little faster.

So the CLI's training commands (`tunelab llm --train`, `tunelab text-classification --train`, a config file) start
themselves again with the allocator preloaded (`LD_PRELOAD`), before anything is imported, when:

- the machine is Linux with no GPU device visible (on a GPU the activations are not malloc'd; not measured there),
- `TUNELAB_ALLOCATOR` is unset or `auto` (`system` keeps glibc's; `tcmalloc`, `jemalloc` or a library path picks),
- the library is installed (`libtcmalloc_minimal.so.4`: Debian/Ubuntu `libgoogle-perftools4`, which
  scripts/install.sh installs when it can; or `libjemalloc.so.2`), and the process is not already running with it.

The run's log names the allocator it found loaded. The Python API runs in the caller's process and cannot change
its allocator: start Python with `LD_PRELOAD` set to get the same.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path

SETTING = "TUNELAB_ALLOCATOR"
STARTED_WITH = "TUNELAB_ALLOCATOR_PRELOADED"  # set in the restarted process: the library it was started with
LIBRARIES = {
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"),
    "jemalloc": ("libjemalloc.so.2", "libjemalloc.so"),
}
SEARCHED = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def find_library(kind: str) -> str | None:
    """The path of an installed `kind` library ("tcmalloc" or "jemalloc"), else None."""
    prefixes = [os.environ.get("CONDA_PREFIX"), sys.prefix]
    folders = [Path(p) / "lib" for p in prefixes if p] + [Path(f) for f in SEARCHED]
    for name in LIBRARIES[kind]:
        for folder in folders:
            if (folder / name).is_file():
                return str(folder / name)
    for name in LIBRARIES[kind]:  # the ld cache, by soname (LD_PRELOAD takes one)
        found = ctypes.util.find_library(name.removeprefix("lib").split(".so")[0])
        if found:
            return found
    return None


def chosen_library(environ: dict[str, str] | None = None) -> str | None:
    """The library to preload for a CPU training run under this environment, or None (keep glibc's malloc)."""
    environ = os.environ if environ is None else environ
    setting = environ.get(SETTING, "auto").strip() or "auto"
    if setting == "system" or not sys.platform.startswith("linux"):
        return None
    if setting == "auto":
        if _gpu_visible():
            return None
        return find_library("tcmalloc") or find_library("jemalloc")
    if setting in LIBRARIES:
        return find_library(setting)
    return setting if Path(setting).is_file() else None


def restart_with_allocator(argv: list[str]) -> None:
    """Replace this process with `python -m tunelab <argv>` preloading the chosen allocator, when there is one and
    it is not loaded already. Returns only when nothing is to be done."""
    if os.environ.get(STARTED_WITH) is not None:
        return  # this is the restarted process (or a launched child of it): never loop
    library = chosen_library()
    if library is None or library in os.environ.get("LD_PRELOAD", "") or loaded_allocator():
        return
    preload = " ".join(p for p in (library, os.environ.get("LD_PRELOAD", "")) if p)
    env = {**os.environ, "LD_PRELOAD": preload, STARTED_WITH: library}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "tunelab", *argv], env)


def loaded_allocator() -> str | None:
    """The tcmalloc or jemalloc library mapped into this process (from /proc/self/maps), else None."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = line.rsplit(" ", 1)[-1]
        if any(name.split(".so")[0] in path for names in LIBRARIES.values() for name in names):
            return path
    return None


def describe() -> str:
    """One line for the run's log: the allocator this process runs with."""
    loaded = loaded_allocator()
    if loaded:
        return f"memory allocator: {Path(loaded).name} ({SETTING}=system keeps glibc's)"
    setting = os.environ.get(SETTING, "auto")
    if setting == "system":
        return f"memory allocator: glibc's ({SETTING}=system)"
    if _gpu_visible() and setting == "auto":
        return "memory allocator: glibc's (a GPU is visible)"
    return (
        "memory allocator: glibc's (no tcmalloc or jemalloc found: on a CPU, installing libgoogle-perftools4 cuts "
        "the peak memory of training by about a third)"
    )


def _gpu_visible() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return any(Path(p).exists() for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg"))
