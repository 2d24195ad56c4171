"""The web app's defences and its job control at their edges, on a real server (tests/test_app_api.py's): an empty
token, the size of what a request may make the app parse or write, uploads (their fields, names, leftovers), the
parameters that name files, a cancel during the evaluation or as a job starts, slow work kept off the event loop,
and the job a killed app leaves running."""

from __future__ import annotations

import gzip
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.test_app_api import REPO, SAMPLE, SHORT_RUN, Client, free_port, new_project, running_app, serving, wait_for

pytest.importorskip("fastapi")
pytest.importorskip("python_multipart")

URLENCODED = {"Content-Type": "application/x-www-form-urlencoded"}
PROMPTS = "".join(json.dumps({"prompt": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(4))


@pytest.fixture
def app(tmp_path, tiny_llama):
    """The app with its worker off: nothing that is queued runs."""
    with running_app(tmp_path / "appdata", allowed_paths=[tiny_llama], max_upload_mb=0.25, start_worker=False) as c:
        yield c


def uploads(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "appdata" / "uploads"
    return sorted(folder.iterdir()) if folder.is_dir() else []


# ---- 1: an empty token


def test_an_empty_token_is_refused_not_taken_for_no_token(tmp_path, monkeypatch, capsys):
    import uvicorn

    from tunelab.app import create_app
    from tunelab.cli import main
    from tunelab.errors import ConfigError

    with pytest.raises(ConfigError, match="access token is empty"):
        create_app(tmp_path / "appdata", token="")
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: pytest.fail("served with an empty token"))
    monkeypatch.setenv("TUNELAB_APP_TOKEN", "")
    assert main(["app", "--port", str(free_port()), "--data-dir", str(tmp_path / "appdata")]) == 2
    assert "access token is empty" in capsys.readouterr().err
    assert main(["app", "--token", " ", "--host", "0.0.0.0", "--port", str(free_port())]) == 2
    assert "access token is empty" in capsys.readouterr().err


# ---- 2: what a request may make the app parse or write


def refused_before_the_body(client: Client, path: str, headers: dict, first_bytes: bytes) -> int:
    """The status answered to the headers and first bytes of a POST, the rest never sent (the old app waited for
    it; sending a body the app refuses unread whole could break the pipe instead)."""
    import http.client

    host, port = client.base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.putrequest("POST", path)
        for name, value in {**URLENCODED, **headers}.items():
            conn.putheader(name, value)
        conn.endheaders(first_bytes)
        return conn.getresponse().status
    finally:
        conn.close()


def test_page_forms_are_limited_before_their_csrf_field_is_read(app):
    declared = {"Content-Length": str(3 * 2**20)}  # 3 MB said, 1 KB sent
    assert refused_before_the_body(app, "/login", declared, b"f=" + b"x" * 1000) == 413
    chunked = {"Transfer-Encoding": "chunked"}  # no size up front: refused as well
    assert refused_before_the_body(app, "/login", chunked, b"7\r\ntoken=x\r\n") == 411
    many = b"&".join(b"f%d=1" % i for i in range(300))
    assert app.request("POST", "/login", many, URLENCODED)[0] == 400
    assert app.post_form("/login", {}, {"data_file": ("a.jsonl", b"{}\n")})[0] == 400  # a page form takes no file
    status, _, _ = app.request("POST", "/login", f"csrf_token={app.csrf()}&token=".encode(), URLENCODED)
    assert status == 303  # an ordinary form still goes through


def test_an_upload_form_takes_its_two_file_fields_only_and_a_bounded_request(app, tiny_llama, tmp_path):
    form = {"name": "p", "trainer": "sft", "model": str(tiny_llama)}
    files = {"data_file": ("a.jsonl", SAMPLE.read_bytes()), "other_file": ("b.jsonl", SAMPLE.read_bytes())}
    status, body = app.post_form("/api/projects", form, files)
    assert status == 400 and "no file is expected here" in body["errors"]["other_file"]
    status, body = app.post_form("/api/projects", {**form, **{f"pad{i}": "1" for i in range(40)}})
    assert status == 400 and "more than 32 fields" in body["errors"]["form"]
    padding = {f"pad{i}": "x" * 60_000 for i in range(20)}  # 1.2 MB of fields beside a 0.2 MB file, no Length
    data = {"data_file": ("a.jsonl", SAMPLE.read_bytes() * 3)}
    status, body = app.post_form("/api/projects", {**form, **padding}, data, chunked=True)
    assert status == 413 and "limit of 0.25 MB" in body["errors"]["data_file"]
    assert uploads(tmp_path) == []  # nothing written by the refused requests


def test_a_refused_project_leaves_no_upload_behind(app, tiny_llama, tmp_path):
    status, body = new_project(app, tiny_llama, data=("broken.jsonl", b'{"instruction": "a", "output": \n'))
    assert status == 400 and "broken.jsonl line 1" in body["errors"]["data_file"]
    status, _ = app.post_form("/projects", {"name": "p", "trainer": "magic", "model": str(tiny_llama)},
                              {"data_file": ("a.jsonl", SAMPLE.read_bytes())})  # fmt: skip
    assert status == 400
    assert uploads(tmp_path) == []


def test_a_long_file_name_keeps_its_suffixes(app, tiny_llama):
    name = "n" * 200 + ".jsonl.gz"
    status, project = new_project(app, tiny_llama, data=(name, gzip.compress(SAMPLE.read_bytes())))
    assert status == 201, project
    stored = Path(project["settings"]["data_path"]).name
    assert stored.endswith("n.jsonl.gz") and len(stored) == 120
    assert project["settings"]["data_columns"] == ["instruction", "input", "output"]


def test_a_path_with_a_name_too_long_for_the_disk_is_refused_on_its_field(app, tiny_llama):
    status, body = new_project(app, tiny_llama, data=None, data_path="a" * 300 + ".jsonl")
    assert status == 400, body
    assert "not a usable path" in body["errors"]["data_path"]


# ---- 3: parameters that name files


def test_parameters_that_name_files_must_lie_inside_the_allowed_folders(app, tiny_llama, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    ran = outside / "imported"
    (outside / "evil.py").write_text(f"open({str(ran)!r}, 'w').close()\n\ndef reward(**kw):\n    return [0.0]\n")
    mine = tmp_path / "appdata" / "mine.py"
    mine.write_text("def reward(completions, **kw):\n    return [0.0] * len(completions)\n")
    status, project = new_project(app, tiny_llama, trainer="grpo", data=("prompts.jsonl", PROMPTS.encode()))
    assert status == 201, project
    preview, jobs = f"/api/projects/{project['id']}/preview", f"/api/projects/{project['id']}/jobs"
    base = {**SHORT_RUN, "num_generations": 2, "max_completion_length": 4}

    # The dry run imports the reward files: one outside the allowed folders never gets that far
    evil = f"format_tag,{outside}/evil.py:reward"
    status, body = app.post_json(preview, {"params": {**base, "reward_functions": evil}})
    assert status == 400 and "outside the folders" in body["errors"]["reward_functions"], body
    assert not ran.exists()
    for name, value in (
        ("model_ref", "/usr/lib"),
        ("reward_json_schema", "/etc/passwd"),
        ("accelerate_config", str(outside / "evil.py")),
        ("reward_functions", "../outside/evil.py:reward"),
        ("reward_functions", str(outside)),  # a reward model's folder: loaded, so inside the allowed ones too
        ("tools", f"{outside}/evil.py:reward"),  # a tools file is imported too
    ):
        status, body = app.post_json(jobs, {"params": {**base, "reward_functions": "format_tag", name: value}})
        assert status == 400 and "outside the folders" in body["errors"][name], (name, body)
    status, body = app.post_json(jobs, {"params": {**base, "reward_functions": "format_tag", "cache_dir": "/tmp/x"}})
    assert status == 400 and "not set from the app" in body["errors"]["cache_dir"]
    assert app.get_json("/api/jobs")[1] == []

    # Inside them (a relative path is taken from the data folder), the path is passed on resolved
    status, job = app.post_json(jobs, {"params": {**base, "reward_functions": "format_tag, mine.py:reward"}})
    assert status == 201, job
    mine = mine.resolve()
    assert job["params"]["reward_functions"] == f"format_tag,{mine}:reward"
    assert f"{mine}:reward" in (Path(job["folder"]) / "config.yaml").read_text()
    from tunelab.app.params import checked_path_value
    from tunelab.app.uploads import FieldError

    tools = checked_path_value("tools", "mine.py:reward, mine.py:other", [mine.parent])
    assert tools == f"{mine}:reward,{mine}:other"
    with pytest.raises(FieldError, match="mine.py: expected file.py:function"):
        checked_path_value("tools", "mine.py", [mine.parent])
    # a mistyped built-in is said to be one, not a missing file
    status, body = app.post_json(preview, {"params": {**base, "reward_functions": "format_tga"}})
    assert status == 400 and "format_tga: not a built-in (answer_tag" in body["errors"]["reward_functions"], body
    # a hub id stays as typed (downloaded into the hub cache, never a path); a folder of that name inside is a path
    from tunelab.app.params import checked_path_value

    roots = [tmp_path / "roots"]
    assert checked_path_value("reward_functions", "format_tag,acme/rm", roots) == "format_tag,acme/rm"
    (roots[0] / "acme" / "rm").mkdir(parents=True)
    assert checked_path_value("reward_functions", "acme/rm", roots) == str((roots[0] / "acme" / "rm").resolve())


# ---- 5, 10: cancel


def test_a_cancel_during_the_evaluation_keeps_the_finished_run(tmp_path, tiny_llama, monkeypatch):
    import tunelab.app.worker

    # The evaluation, long enough to be cancelled while it runs (the training before it is the real one)
    sleep = ["-c", "import time; time.sleep(120)"]
    monkeypatch.setattr(tunelab.app.worker, "evaluate_command", lambda python, job: [python, *sleep])
    with running_app(tmp_path / "appdata", allowed_paths=[tiny_llama]) as client:
        _, project = new_project(client, tiny_llama)
        _, job = client.post_json(f"/api/projects/{project['id']}/jobs", {"params": SHORT_RUN, "evaluate": True})
        log = Path(job["folder"]) / "train.log"
        deadline = time.time() + 240
        while "time.sleep(120)" not in (log.read_text() if log.is_file() else ""):
            # (queued until the worker takes it, which a busy machine may not do by the first look)
            status = client.get_json(f"/api/jobs/{job['id']}")[1]["status"]
            assert time.time() < deadline and status in ("queued", "running"), status
            time.sleep(0.2)
        assert client.post_json(f"/api/jobs/{job['id']}/cancel", {})[1] == {"cancelled": True}
        (done,) = wait_for(client, [job["id"]], timeout=60)
        assert done["status"] == "completed", done
        assert "evaluation was stopped (cancelled)" in done["message"]
        assert "tunelab app: the evaluation was stopped (cancelled); the run itself is complete" in log.read_text()
        status, _, archive = client.request("GET", f"/jobs/{job['id']}/download")
        assert status == 200 and archive[:2] == b"PK"


def test_a_cancel_in_the_moment_a_job_is_taken_is_not_lost(tmp_path, tiny_llama, monkeypatch):
    from tunelab.app.jobs import JobStore

    taken = threading.Event()
    next_queued = JobStore.next_queued

    def slowly(store):  # widen the moment between "running" in the database and the worker knowing it
        job = next_queued(store)
        if job is not None:
            taken.set()
            time.sleep(1.0)
        return job

    monkeypatch.setattr(JobStore, "next_queued", slowly)
    with running_app(tmp_path / "appdata", allowed_paths=[tiny_llama]) as client:
        _, project = new_project(client, tiny_llama)
        _, job = client.post_json(f"/api/projects/{project['id']}/jobs", {"params": SHORT_RUN, "evaluate": False})
        assert taken.wait(10)
        assert client.post_json(f"/api/jobs/{job['id']}/cancel", {})[1] == {"cancelled": True}
        (done,) = wait_for(client, [job["id"]], timeout=60)
        assert done["status"] == "cancelled", done


# ---- 6: slow work off the event loop


def test_cancel_and_the_data_check_leave_the_app_answering(tmp_path, tiny_llama, monkeypatch):
    import tunelab.app.projects
    import tunelab.app.worker
    from tunelab.app import create_app

    def answers_within(client: Client, seconds: float) -> bool:
        start = time.monotonic()
        assert Client(client.base).request("GET", "/api/jobs")[0] == 200  # a second browser, say
        return time.monotonic() - start < seconds

    check_data_file = tunelab.app.projects.check_data_file
    monkeypatch.setattr(tunelab.app.projects, "check_data_file", lambda *a: (time.sleep(2), check_data_file(*a))[1])
    monkeypatch.setattr(tunelab.app.worker, "STOP_GRACE_SECONDS", 3)
    # A job process that ignores SIGTERM, so that a cancel waits the grace period out before its SIGKILL
    stubborn = tmp_path / "stubborn"
    stubborn.write_text("#!/bin/sh\ntrap '' TERM\ntouch started\nsleep 60\n")
    stubborn.chmod(0o755)
    app = create_app(tmp_path / "appdata", allowed_paths=[tiny_llama])
    app.state.tunelab.worker.python = str(stubborn)
    with serving(app) as client:
        created = []
        slow = threading.Thread(target=lambda: created.append(new_project(client, tiny_llama)))
        slow.start()
        time.sleep(0.5)
        assert answers_within(client, 1.0)  # while the upload's data is read
        slow.join()
        ((status, project),) = created
        assert status == 201, project
        _, job = client.post_json(f"/api/projects/{project['id']}/jobs", {"params": SHORT_RUN, "evaluate": False})
        deadline = time.time() + 30
        while not (Path(job["folder"]) / "started").exists():
            assert time.time() < deadline
            time.sleep(0.1)
        cancel = threading.Thread(target=client.post_json, args=(f"/api/jobs/{job['id']}/cancel", {}))
        cancel.start()
        time.sleep(0.5)
        assert answers_within(client, 1.0)  # while the cancel waits for the process
        cancel.join()
        (done,) = wait_for(client, [job["id"]], timeout=30)
        assert done["status"] == "cancelled"


# ---- 4: the job a killed app leaves running


def processes_naming(folder: Path) -> list[int]:
    """The living processes whose command line names `folder` (a zombie's is empty)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(folder) in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.skipif(not Path("/proc/self/cmdline").is_file(), reason="reads /proc")
@pytest.mark.parametrize("forget_group", [False, True], ids=["stored-group", "no-group-stored"])
def test_a_job_left_running_by_a_killed_app_is_stopped_when_the_app_starts_again(tmp_path, tiny_llama, forget_group):
    data_dir = tmp_path / "appdata"
    port = free_port()
    serve = f"from tunelab.app import run_app; run_app(port={port}, data_dir={str(data_dir)!r}, allowed_paths=[{str(tiny_llama)!r}])"  # noqa: E501
    app_process = subprocess.Popen([sys.executable, "-c", serve], cwd=REPO)
    folder = None
    try:
        client = Client(f"http://127.0.0.1:{port}")
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(client.base + "/api/machine", timeout=5).close()
                break
            except OSError:
                assert time.time() < deadline and app_process.poll() is None, "the app did not start"
                time.sleep(0.2)
        _, project = new_project(client, tiny_llama)
        params = {**SHORT_RUN, "max_steps": 100_000}
        _, job = client.post_json(f"/api/projects/{project['id']}/jobs", {"params": params, "evaluate": False})
        folder = Path(job["folder"])
        while not processes_naming(folder):
            assert time.time() < deadline + 30, "the job did not start"
            time.sleep(0.1)
        app_process.kill()  # the app dies without stopping its job: the trainer lives on, in its own session
        app_process.wait()
        # (looked for a few times: a trainer that restarts itself with a faster allocator has, for a moment
        # while it does, no command line to read)
        for _ in range(20):
            time.sleep(0.25)
            if processes_naming(folder):
                break
        assert processes_naming(folder), "the trainer died with the app: nothing left to stop"
        if forget_group:  # an app killed before it stored the group it had just started: found by the folder
            with sqlite3.connect(data_dir / "app.db") as db:
                db.execute("UPDATE jobs SET pgid = NULL")

        with running_app(data_dir, allowed_paths=[tiny_llama], start_worker=False) as again:
            assert processes_naming(folder) == []
            (found,) = again.get_json("/api/jobs")[1]
            assert found["status"] == "interrupted"
    finally:
        if app_process.poll() is None:
            app_process.kill()
        for _ in range(3 if folder else 0):  # (again after a moment: one may be between two programs)
            for pid in processes_naming(folder):
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.25)
