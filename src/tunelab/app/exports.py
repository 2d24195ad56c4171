"""What the job page does with a finished run in the background: export it (GGUF with a quant type and its Ollama
Modelfile, the LoRA adapter alone as llama.cpp's adapter GGUF, or the merged full model as safetensors) and push it
to the hub.

Each action (`inference.ollama.export_ollama`, `inference.gguf_adapter.export_adapter`, `inference.merge.merge_run`,
`hub.push_folder`) runs in a thread of
the app, one per job and kind at a time; the page polls its state. While it runs, the state carries the action's
latest log line (its progress: "merging...", "writing...", "quantizing...") and the seconds since it began. The
files land in `<job>/export/` and are downloaded from there; a failed action keeps its one-line reason. A token
given for a push lives in the thread only.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError

log = logging.getLogger("tunelab")

EXPORT_DIR = "export"
GGUF_FILES = ("model.gguf", "Modelfile")
ADAPTER_FILE = "adapter.gguf"  # the LoRA adapter alone, for llama.cpp's --lora on a GGUF of the base
MERGED_DIR = "merged"  # <job>/export/merged/: the full model, downloaded as merged.zip
KINDS = ("gguf", "adapter", "merged", "push")


def offered_dtypes() -> list[str]:
    """The types the GGUF export offers: the K-quants only where llama.cpp's quantizer is installed."""
    written = ["f16", "q8_0"]
    return (["q4_k_m", "q5_k_m", "q6_k"] + written) if importlib.util.find_spec("llama_cpp") else written


class _Progress(logging.Handler):
    """Keeps the latest tunelab log line written by one thread: the running action's progress."""

    def __init__(self, thread_id: int, state: dict[str, Any]) -> None:
        super().__init__(logging.INFO)
        self.thread_id, self.state = thread_id, state

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread_id:
            self.state["progress"] = record.getMessage()[:300]


class Exports:
    """The actions of each job: running (with progress), done (files or a URL) or failed (the reason)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state: dict[tuple[int, str], dict[str, Any]] = {}

    def start(self, job_id: int, run: Path, job_folder: Path, kind: str, **options: Any) -> dict[str, Any]:
        """Start an action on `run`; returns its state (already running: the running one's).

        gguf: dtype (one of offered_dtypes()); adapter, merged: nothing; push: repo_id and token."""
        if kind not in KINDS:
            raise TunelabError(f"export: {kind!r} is not one of {', '.join(KINDS)}")
        if kind == "gguf" and options.get("dtype") not in offered_dtypes():
            raise TunelabError(f"export: dtype {options.get('dtype')!r} is not one of {', '.join(offered_dtypes())}")
        if kind in ("adapter", "merged") and not (run / "adapter_config.json").is_file():
            raise TunelabError("export: this run holds full model weights already: download the run instead")
        repo_id = options.get("repo_id")
        if kind == "push" and not (isinstance(repo_id, str) and repo_id.count("/") == 1):
            raise TunelabError("push: give the hub repository as owner/name")
        with self._lock:
            if self._state.get((job_id, kind), {}).get("state") == "running":
                return self.status(job_id, job_folder, kind)
            shown = {k: v for k, v in options.items() if k != "token"}
            self._state[(job_id, kind)] = {"state": "running", "started": time.time(), **shown}
        thread = threading.Thread(
            target=self._run, args=(job_id, kind, run, job_folder / EXPORT_DIR, options), daemon=True
        )
        thread.start()
        return self.status(job_id, job_folder, kind)

    def _run(self, job_id: int, kind: str, run: Path, target: Path, options: dict[str, Any]) -> None:
        state = self._state[(job_id, kind)]
        progress = _Progress(threading.get_ident(), state)
        log.addHandler(progress)
        try:
            outcome = {"state": "done", **self._act(kind, run, target, options)}
        except TunelabError as error:
            outcome = {"state": "failed", "error": str(error)}
        except Exception as error:  # noqa: BLE001 - the page shows it instead of a thread dying silently
            log.exception("app: %s of job %d failed", kind, job_id)
            outcome = {"state": "failed", "error": f"{type(error).__name__}: {error}"}
        finally:
            log.removeHandler(progress)
        with self._lock:
            kept = {k: v for k, v in state.items() if k not in ("state", "progress")}
            self._state[(job_id, kind)] = {**kept, **outcome, "finished": time.time()}

    @staticmethod
    def _act(kind: str, run: Path, target: Path, options: dict[str, Any]) -> dict[str, Any]:
        if kind == "gguf":
            from tunelab.inference.ollama import export_ollama

            export_ollama(run, target, options["dtype"])
            return {}
        if kind == "adapter":
            from tunelab.inference.gguf_adapter import export_adapter

            export_adapter(run, target / ADAPTER_FILE, "f16")  # written beside its name, renamed when whole
            return {}
        if kind == "merged":
            import os
            import shutil

            from tunelab.inference.merge import merge_run

            # A new merge replaces the last one only once it is complete: the old folder stays whole till then.
            fresh = target / f".{MERGED_DIR}-{time.time_ns()}"
            merge_run(run, fresh)
            old = target / f".{MERGED_DIR}-old-{time.time_ns()}"
            if (target / MERGED_DIR).exists():
                os.replace(target / MERGED_DIR, old)
            os.replace(fresh, target / MERGED_DIR)
            shutil.rmtree(old, ignore_errors=True)
            return {}
        from tunelab.hub import push_folder

        return {"url": push_folder(str(run), options["repo_id"], options.get("token") or None)}

    def status(self, job_id: int, job_folder: Path, kind: str = "gguf") -> dict[str, Any]:
        """The state, and the exported files once there (also after an app restart: they are on disk)."""
        with self._lock:
            state = dict(self._state.get((job_id, kind), {}))
        folder = job_folder / EXPORT_DIR
        on_disk = {
            "gguf": (folder / "Modelfile").is_file(),
            "adapter": (folder / ADAPTER_FILE).is_file(),
            "merged": (folder / MERGED_DIR / "config.json").is_file(),
        }
        if not state and on_disk.get(kind):
            state = {"state": "done"}
        state.setdefault("state", "none")
        if state["state"] == "running":
            state["seconds"] = round(time.time() - state["started"])
        if state["state"] == "done" and kind == "gguf":
            state["files"] = [
                {"name": name, "bytes": (folder / name).stat().st_size, "url": f"/jobs/{job_id}/export/{name}"}
                for name in GGUF_FILES
                if (folder / name).is_file()
            ]
            state["command"] = f"ollama create NAME -f {folder / 'Modelfile'}"
        if state["state"] == "done" and kind == "adapter":
            size = (folder / ADAPTER_FILE).stat().st_size
            state["files"] = [{"name": ADAPTER_FILE, "bytes": size, "url": f"/jobs/{job_id}/export/{ADAPTER_FILE}"}]
            state["command"] = f"llama-cli -m BASE.gguf --lora {folder / ADAPTER_FILE}"
        if state["state"] == "done" and kind == "merged":
            size = sum(p.stat().st_size for p in (folder / MERGED_DIR).rglob("*") if p.is_file())
            state["files"] = [{"name": "merged.zip", "bytes": size, "url": f"/jobs/{job_id}/export/merged.zip"}]
            state["folder"] = str(folder / MERGED_DIR)
        return state


def export_file(job_folder: Path, name: str) -> Path | None:
    """An exported file of the job, by name; None for any other name (no path leaves the export folder)."""
    path = job_folder / EXPORT_DIR / name
    return path if name in (*GGUF_FILES, ADAPTER_FILE) and path.is_file() else None


def merged_folder(job_folder: Path) -> Path | None:
    """The job's merged model folder, once exported."""
    folder = job_folder / EXPORT_DIR / MERGED_DIR
    return folder if (folder / "config.json").is_file() else None
