"""The web app's memory: projects and jobs in one SQLite file (`<data_dir>/app.db`), stdlib `sqlite3` only.

A project is what the new-project and data pages decide (task, base model, data, column mapping); a job is one
training run of it with its parameters. The worker (worker.py) moves a job through its states; the pages read them.
Each call opens its own connection, so the request threads and the worker thread never share one.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED, INTERRUPTED = (
    "queued",
    "running",
    "completed",
    "failed",
    "cancelled",
    "interrupted",
)
FINISHED = (COMPLETED, FAILED, CANCELLED, INTERRUPTED)

SCHEMA = """
CREATE TABLE IF NOT EXISTS projects (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    created REAL NOT NULL,
    settings TEXT NOT NULL              -- JSON: task, model, data_path, valid_path, column mapping
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id INTEGER NOT NULL REFERENCES projects(id),
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    params TEXT NOT NULL,               -- JSON, the token redacted (params.to_dict(redact=True))
    folder TEXT NOT NULL,               -- the job's folder: config.yaml, train.log, run/
    evaluate INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    exit_code INTEGER,
    message TEXT,
    sealed_token TEXT,                  -- the hub token encrypted (vault.py) until the job completes or is cancelled
    pgid INTEGER                        -- the process group of its running process (worker.py), while it runs
);
"""
# Columns added after the first release: an older app.db gets them on open.
ADDED_COLUMNS = {"jobs": (("sealed_token", "TEXT"), ("pgid", "INTEGER"))}


class JobStore:
    """Projects and jobs, persisted in `path`; safe to use from several threads."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(SCHEMA)
            for table, columns in ADDED_COLUMNS.items():
                have = {row["name"] for row in db.execute(f"PRAGMA table_info({table})")}
                for name, kind in columns:
                    if name not in have:
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        try:
            with db:  # one transaction per block: committed on success, rolled back on error
                yield db
        finally:
            db.close()

    # ---- projects

    def add_project(self, name: str, settings: dict[str, Any]) -> int:
        with self._connect() as db:
            cur = db.execute(
                "INSERT INTO projects (name, created, settings) VALUES (?, ?, ?)",
                (name, time.time(), json.dumps(settings)),
            )
            return int(cur.lastrowid)

    def project(self, project_id: int) -> dict[str, Any] | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM projects WHERE id = ?", (project_id,)).fetchone()
        if row is None:
            return None
        project = dict(row)
        project["settings"] = json.loads(project["settings"])
        return project

    def update_project(self, project_id: int, settings: dict[str, Any]) -> None:
        with self._connect() as db:
            db.execute("UPDATE projects SET settings = ? WHERE id = ?", (json.dumps(settings), project_id))

    def projects(self) -> list[dict[str, Any]]:
        with self._connect() as db:
            rows = db.execute("SELECT id, name, created FROM projects ORDER BY id DESC").fetchall()
        return [dict(row) for row in rows]

    # ---- jobs

    def add_job(
        self,
        project_id: int,
        name: str,
        params: dict[str, Any],
        folder: Path,
        evaluate: bool,
        sealed_token: str | None = None,
    ) -> int:
        with self._connect() as db:
            cur = db.execute(
                "INSERT INTO jobs (project_id, name, status, params, folder, evaluate, created, sealed_token) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (project_id, name, QUEUED, json.dumps(params), str(folder), int(evaluate), time.time(), sealed_token),
            )
            return int(cur.lastrowid)

    def sealed_token(self, job_id: int) -> str | None:
        """The job's sealed token: kept while the job may still run (queued, or failed or interrupted and so
        resumable), deleted when it completes or is cancelled."""
        with self._connect() as db:
            row = db.execute("SELECT sealed_token FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else row["sealed_token"]

    def job(self, job_id: int) -> dict[str, Any] | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job(row)

    def jobs(self) -> list[dict[str, Any]]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM jobs ORDER BY id DESC").fetchall()
        return [_job(row) for row in rows]

    def next_queued(self) -> dict[str, Any] | None:
        """The oldest queued job, marked running in the same transaction (so it is taken once)."""
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE status = ? ORDER BY id LIMIT 1", (QUEUED,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET status = ?, started = ? WHERE id = ?", (RUNNING, time.time(), row["id"]))
        return self.job(row["id"])

    def set_process(self, job_id: int, pgid: int | None) -> None:
        """The process group the job's process runs in now (None: none), for an app that restarts after it was
        killed to find what its predecessor left running (worker.stop_leftovers)."""
        with self._connect() as db:
            db.execute("UPDATE jobs SET pgid = ? WHERE id = ?", (pgid, job_id))

    def finish(self, job_id: int, status: str, exit_code: int | None = None, message: str | None = None) -> None:
        assert status in FINISHED, status
        with self._connect() as db:
            db.execute(
                "UPDATE jobs SET status = ?, finished = ?, exit_code = ?, message = ?, pgid = NULL WHERE id = ?",
                (status, time.time(), exit_code, message, job_id),
            )
            if status in (COMPLETED, CANCELLED):  # it will not run again: its token goes
                db.execute("UPDATE jobs SET sealed_token = NULL WHERE id = ?", (job_id,))

    def cancel_queued(self, job_id: int) -> bool:
        """Cancel a job that has not started; False when it is no longer queued."""
        with self._connect() as db:
            cur = db.execute(
                "UPDATE jobs SET status = ?, finished = ?, sealed_token = NULL WHERE id = ? AND status = ?",
                (CANCELLED, time.time(), job_id, QUEUED),
            )
            return cur.rowcount == 1

    def requeue(self, job_id: int) -> bool:
        """Queue a stopped job again (a crashed or interrupted run resumes from its last checkpoint)."""
        with self._connect() as db:
            cur = db.execute(
                "UPDATE jobs SET status = ?, started = NULL, finished = NULL, exit_code = NULL, message = NULL "
                "WHERE id = ? AND status IN (?, ?, ?)",
                (QUEUED, job_id, FAILED, CANCELLED, INTERRUPTED),
            )
            return cur.rowcount == 1

    def mark_interrupted(self) -> int:
        """Jobs left running by an app that is gone: their process died with it, was stopped by it, or (a killed
        app) by the next one (worker.stop_leftovers, called first)."""
        with self._connect() as db:
            cur = db.execute(
                "UPDATE jobs SET status = ?, finished = ?, message = ?, pgid = NULL WHERE status = ?",
                (INTERRUPTED, time.time(), "the app stopped while this job was running", RUNNING),
            )
            return cur.rowcount


def _job(row: sqlite3.Row) -> dict[str, Any]:
    job = dict(row)
    job["has_token"] = bool(job.pop("sealed_token", None))  # never handed out, not even sealed
    job["params"] = json.loads(job["params"])
    job["evaluate"] = bool(job["evaluate"])
    return job
