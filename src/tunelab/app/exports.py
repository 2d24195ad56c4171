"""Exporting a finished job for Ollama and llama.cpp from the app: the job page's Export button.

The export (`inference.ollama.export_ollama`: merge a LoRA run, write the GGUF file, quantize, write the
Modelfile) runs in a thread of the app, one per job at a time; the page polls its state. The files land in
`<job>/export/` (model.gguf, Modelfile) and are downloaded from there. A failed export keeps its one-line reason.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError

log = logging.getLogger("tunelab")

EXPORT_DIR = "export"
FILES = ("model.gguf", "Modelfile")


def offered_dtypes() -> list[str]:
    """The types the button offers: the K-quants only where llama.cpp's quantizer is installed."""
    written = ["f16", "q8_0"]
    return (["q4_k_m", "q5_k_m", "q6_k"] + written) if importlib.util.find_spec("llama_cpp") else written


class Exports:
    """The export of each job: running, done (its files) or failed (the reason)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state: dict[int, dict[str, Any]] = {}

    def start(self, job_id: int, run: Path, job_folder: Path, dtype: str) -> dict[str, Any]:
        """Start exporting `run`; returns the state (already running: the running one's)."""
        if dtype not in offered_dtypes():
            raise TunelabError(f"export: dtype {dtype!r} is not one of {', '.join(offered_dtypes())}")
        with self._lock:
            if self._state.get(job_id, {}).get("state") == "running":
                return dict(self._state[job_id])
            self._state[job_id] = {"state": "running", "dtype": dtype}
        target = job_folder / EXPORT_DIR
        thread = threading.Thread(target=self._run, args=(job_id, run, target, dtype), daemon=True)
        thread.start()
        return self.status(job_id, job_folder)

    def _run(self, job_id: int, run: Path, target: Path, dtype: str) -> None:
        from tunelab.inference.ollama import export_ollama

        try:
            export_ollama(run, target, dtype)
        except TunelabError as error:
            outcome = {"state": "failed", "error": str(error)}
        except Exception as error:  # noqa: BLE001 - the page shows it instead of a thread dying silently
            log.exception("app: export of job %d failed", job_id)
            outcome = {"state": "failed", "error": f"{type(error).__name__}: {error}"}
        else:
            outcome = {"state": "done"}
        with self._lock:
            self._state[job_id] = {**outcome, "dtype": dtype}

    def status(self, job_id: int, job_folder: Path) -> dict[str, Any]:
        """The state, and the exported files once there (also after an app restart: they are on disk)."""
        with self._lock:
            state = dict(self._state.get(job_id, {}))
        folder = job_folder / EXPORT_DIR
        if not state and (folder / "Modelfile").is_file():
            state = {"state": "done"}
        state.setdefault("state", "none")
        if state["state"] == "done":
            state["files"] = [
                {"name": name, "bytes": (folder / name).stat().st_size, "url": f"/jobs/{job_id}/export/{name}"}
                for name in FILES
                if (folder / name).is_file()
            ]
            state["command"] = f"ollama create NAME -f {folder / 'Modelfile'}"
        return state


def export_file(job_folder: Path, name: str) -> Path | None:
    """An exported file of the job, by name; None for any other name (no path leaves the export folder)."""
    path = job_folder / EXPORT_DIR / name
    return path if name in FILES and path.is_file() else None
