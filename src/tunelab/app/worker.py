"""The background worker: one thread that runs queued jobs one after the other, each as its own process.

A job is `python -m tunelab.cli --config <job>/config.yaml` (the same code path as the CLI), then, when asked,
`tunelab evaluate` on the finished run. Running it as a child process means a crash, an out-of-memory kill or a
cancel never takes the app down. The child gets its own process group so that cancel stops it and anything it
started (dataloader workers, accelerate). Its stdout and stderr go to `<job>/train.log`, which the job page tails.
The hub token reaches the child as HF_TOKEN, never in a file of the job; until the job completes or is cancelled
it is kept sealed in the database (vault.py), so a queued job keeps it across a restart of the app, and a failed
or interrupted one when it resumes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tunelab.app.jobs import CANCELLED, COMPLETED, FAILED, INTERRUPTED, RUNNING, JobStore
from tunelab.app.vault import Vault
from tunelab.launch import kill_with_descendants
from tunelab.methods import REGISTRY

log = logging.getLogger("tunelab")

CONFIG_FILE, LOG_FILE, RUN_DIR = "config.yaml", "train.log", "run"
STOP_GRACE_SECONDS = 10  # after SIGTERM, before SIGKILL
# `tunelab evaluate` measures language models on their text/chat rows, preference runs (dpo, kto, orpo, simpo,
# reward) by their figures on their pairs (kto: its labeled answers); grpo's prompts have no answer to measure.
EVALUATED_TRAINERS = tuple(name for name, entry in REGISTRY.items() if entry.data != "prompts")


def run_folder(job: dict[str, Any]) -> Path:
    """Where the finished run of a job lands (its staging twin is `.run.partial` beside it)."""
    return Path(job["folder"]) / RUN_DIR


def staging_folder(job: dict[str, Any]) -> Path:
    return Path(job["folder"]) / f".{RUN_DIR}.partial"


class Worker:
    """Runs the store's queued jobs in order, one at a time (one device, one job)."""

    def __init__(
        self, store: JobStore, vault: Vault, python: str = sys.executable, before_job: Any = lambda: None
    ) -> None:
        self.store = store
        self.vault = vault
        self.python = python
        self.before_job = before_job  # called as each job's process starts (the app frees its chat models' GPU)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # guards the fields below
        self._process: subprocess.Popen | None = None
        self._current: int | None = None
        self._cancelled: set[int] = set()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="tunelab-app-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop taking jobs and stop the running one (it is marked interrupted; re-queue it to resume)."""
        self._stopping.set()
        self._wake.set()
        self._terminate()
        if self._thread is not None:
            self._thread.join(timeout=STOP_GRACE_SECONDS + 5)

    def submit(self, job_id: int) -> None:
        """Tell the worker a job was queued (its token, if any, is sealed in the store)."""
        self._wake.set()

    def cancel(self, job_id: int) -> bool:
        """Cancel a queued job, or stop the running one; False when the job is neither. Waits for the job's
        process to stop (up to STOP_GRACE_SECONDS): call it off the event loop."""
        # Under the lock that the worker takes a job under: a job is either still queued here, or already the
        # current one - never "running" in the store but not yet current, where a cancel would be lost.
        with self._lock:
            if self.store.cancel_queued(job_id):
                return True
            if self._current != job_id:
                return False
            self._cancelled.add(job_id)
        self._terminate()
        return True

    # ---- the thread

    def _loop(self) -> None:
        while not self._stopping.is_set():
            with self._lock:  # taken and made current in one step (see cancel)
                job = self.store.next_queued()
                self._current = None if job is None else job["id"]
            if job is None:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                self._run(job)
            except Exception as err:  # a bug here must not stop the queue: the job fails, the next one runs
                log.exception("app worker: job %s", job["id"])
                self.store.finish(job["id"], FAILED, message=f"the app could not run this job: {err}")

    def _run(self, job: dict[str, Any]) -> None:
        """Train, then evaluate when asked; `job` is already the current one (_loop)."""
        folder = Path(job["folder"])
        trained, note = False, None
        try:
            sealed = self.store.sealed_token(job["id"])
            token = self.vault.open(sealed) if sealed else None
            code = self._call(job, [self.python, "-m", "tunelab.cli", "--config", str(folder / CONFIG_FILE)], token)
            # A training that exited 0 and left its run folder is complete, whatever comes after: a cancel or a
            # stop during the evaluation stops the evaluation only (the run stays usable and is not resumed).
            trained = code == 0 and run_folder(job).is_dir()
            if trained and job["evaluate"] and job["params"].get("trainer") in EVALUATED_TRAINERS:
                evaluated = self._call(job, evaluate_command(self.python, job), None)  # a failed one keeps the run
                with self._lock:
                    why = "cancelled" if job["id"] in self._cancelled else None
                why = why or ("the app stopped" if self._stopping.is_set() else None)
                if evaluated != 0 and why:
                    note = f"the evaluation was stopped ({why}); the run itself is complete"
                    with (folder / LOG_FILE).open("a", encoding="utf-8") as out:
                        out.write(f"tunelab app: {note}\n")
        finally:
            with self._lock:
                self._current = None
                cancelled = job["id"] in self._cancelled
                self._cancelled.discard(job["id"])
        if trained:
            self.store.finish(job["id"], COMPLETED, code, note)
        elif cancelled:
            self.store.finish(job["id"], CANCELLED, code, "cancelled")
        elif self._stopping.is_set():
            self.store.finish(job["id"], INTERRUPTED, code, "the app stopped while this job was running")
        else:
            self.store.finish(job["id"], FAILED, code, last_error(folder / LOG_FILE) or f"exit code {code}")

    def _call(self, job: dict[str, Any], command: list[str], token: str | None) -> int:
        folder = Path(job["folder"])
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        if token:
            env["HF_TOKEN"] = token
        self.before_job()
        with (folder / LOG_FILE).open("ab") as out:
            out.write(f"$ {' '.join(command[1:])}\n".encode())
            out.flush()
            process = subprocess.Popen(
                command, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
            with self._lock:
                self._process = process
            self.store.set_process(job["id"], process.pid)  # its own session: the group id is its pid
            if self._stopping.is_set() or job["id"] in self._cancelled:
                self._terminate()  # a stop or cancel that came while the process was being started
            code = process.wait()
            with self._lock:
                self._process = None
        return code

    def _terminate(self) -> None:
        """SIGTERM the running job's process group, SIGKILL it if it has not gone after the grace period."""
        with self._lock:
            process = self._process
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            kill_group(process.pid)
        except ProcessLookupError:
            pass


def stop_leftovers(store: JobStore) -> int:
    """Stop what jobs found "running" still run: the processes an app that was killed (SIGKILL, a crash) left.

    A job's process has its own session (so that a cancel reaches everything it started), so it outlives an app
    that dies without stopping it, and a Resume would then train a second process into the same folder. The
    group id is stored with the job; a group still living is SIGTERMed (SIGKILLed after the grace period) only
    when one of its processes names the job's folder in its command line, as a reused group id would not. An app
    killed between starting the process and storing its group left none: the groups of the processes that name
    the folder are stopped then.
    (PR_SET_PDEATHSIG was the other way: it reaches only the direct child, not the accelerate or data-loader
    processes of its group, fires when the thread that started it ends rather than the app, is Linux-only and
    needs a preexec_fn, which is unsafe in a threaded app.) Returns the number of groups stopped.
    """
    stopped = 0
    for job in store.jobs():
        if job["status"] != RUNNING:
            continue
        groups = [job["pgid"]] if job.get("pgid") else groups_naming(job["folder"])
        for pgid in groups:
            if not any(job["folder"] in c for c in group_commands(pgid)):
                continue
            log.info("app: job %s is still running from before (process group %d): stopping it", job["id"], pgid)
            try:
                os.killpg(pgid, signal.SIGTERM)
                deadline = time.monotonic() + STOP_GRACE_SECONDS
                while group_commands(pgid) and time.monotonic() < deadline:
                    time.sleep(0.1)
                if group_commands(pgid):
                    kill_group(pgid)
            except ProcessLookupError:
                pass
            stopped += 1
    return stopped


def groups_naming(folder: str) -> list[int]:
    """The process groups of the living processes whose command line names `folder` (psutil: any system)."""
    import psutil  # accelerate's own dependency

    groups = []
    for process in psutil.process_iter(["pid", "cmdline", "status"]):
        command = " ".join(process.info["cmdline"] or [])
        if folder in command and process.info["status"] != psutil.STATUS_ZOMBIE:
            group = _group_of(process.info["pid"])
            if group is not None and group not in groups and group != os.getpgid(0):  # (never the app's own)
                groups.append(group)
    return groups


def kill_group(pgid: int) -> None:
    """SIGKILL process group `pgid` and every process under its members: a distributed run's workers run in
    sessions of their own (torch's elastic agent starts them so), out of the group's reach, and killed with the
    group alone they would train on, orphaned. (SIGTERM reaches them through the agent, which stops them itself.)"""
    import psutil  # accelerate's own dependency

    kill_with_descendants([p.pid for p in psutil.process_iter(["pid"]) if _group_of(p.pid) == pgid])
    with contextlib.suppress(ProcessLookupError):  # one that joined the group meanwhile
        os.killpg(pgid, signal.SIGKILL)


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def group_commands(pgid: int) -> list[str]:
    """The command lines of the living (not zombie) processes in process group `pgid`: /proc, else `ps`."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").is_file():  # macOS, the BSDs
        try:
            listed = subprocess.run(["ps", "-A", "-o", "pgid=,stat=,command="], capture_output=True, text=True)
        except OSError:
            return []
        rows = [line.split(None, 2) for line in listed.stdout.splitlines()]
        return [row[2] for row in rows if len(row) == 3 and row[0] == str(pgid) and not row[1].startswith("Z")]
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses, so split after the last ")"
            state, _, group = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            if state != "Z" and int(group) == pgid:
                found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace"))
        except (OSError, ValueError):  # gone meanwhile, or not ours to read
            continue
    return found


def evaluate_command(python: str, job: dict[str, Any]) -> list[str]:
    """`tunelab evaluate` on the finished run: on the validation file when there is one, else the training data,
    whose `--split valid` is then the examples (pairs, for a preference run) valid_size held out when the run had
    it (data/holdout.py), else the whole file. A preference run's file of pairs is measured by its figures."""
    params = job["params"]
    data = params.get("valid_split") or params["data_path"]
    return [
        python, "-m", "tunelab.cli", "evaluate", "--model", str(run_folder(job)), "--data-path", str(data),
        "--split", "valid", "--max-rows", "50", "--samples", "2", "--max-new-tokens", "48", "--compare-base",
    ]  # fmt: skip


def last_error(log_file: Path) -> str | None:
    """The `tunelab: error: ...` line a failed run ends with (the whole story is in the log)."""
    if not log_file.is_file():
        return None
    with log_file.open("rb") as f:
        f.seek(max(0, log_file.stat().st_size - 64 * 1024))
        lines = f.read().decode("utf-8", "replace").splitlines()
    for line in reversed(lines):
        if line.startswith("tunelab: error:"):
            return line.removeprefix("tunelab: error:").strip()
    for line in reversed(lines):
        if line.strip():
            return line.strip()[:500]
    return None
