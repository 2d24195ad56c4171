"""The web app's API on a real server (uvicorn on a free port, stdlib HTTP client): uploads and their errors, paths
that leave the allowed folders, CSRF, the access token, and jobs that really train a tiny model - one after the
other, and still listed after the app restarts."""

from __future__ import annotations

import http.cookiejar
import json
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("python_multipart")

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "samples" / "alpaca.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(data_dir: Path, **options):
    """The app served by uvicorn in a thread, as `tunelab app` serves it; stopped (worker included) on exit."""
    from tunelab.app import create_app

    with serving(create_app(data_dir, **options)) as client:
        yield client


@contextmanager
def serving(app):
    """An app made by create_app (a test may change its parts first), served as running_app serves it."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline, "the app did not start"
        time.sleep(0.05)
    try:
        yield Client(f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        thread.join(timeout=30)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


class Client:
    """A browser-like client: keeps cookies, does not follow redirects, returns (status, headers, body)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar), _NoRedirect)

    def request(self, method: str, path: str, data=None, headers: dict | None = None):
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers or {})
        try:
            with self.opener.open(req, timeout=120) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.headers, err.read()

    def get_json(self, path: str, **headers):
        status, _, body = self.request("GET", path, headers=headers)
        return status, json.loads(body or b"null")

    def csrf(self) -> str:
        """The CSRF cookie the pages set (fetching a page first when there is none yet)."""
        if not any(c.name == "tunelab_csrf" for c in self.jar):
            self.request("GET", "/")
        return next(c.value for c in self.jar if c.name == "tunelab_csrf")

    def post_json(self, path: str, body: dict, csrf: bool = True, **headers):
        headers = {"Content-Type": "application/json", **headers}
        if csrf:
            headers["X-CSRF-Token"] = self.csrf()
        status, _, raw = self.request("POST", path, json.dumps(body).encode(), headers)
        return status, json.loads(raw or b"null")

    def post_form(self, path: str, fields: dict, files: dict | None = None, csrf: bool = True, chunked: bool = False):
        """A multipart form as a browser sends it: the CSRF field first, then the fields, then the files (chunked:
        without a Content-Length, as a streaming client may send it)."""
        boundary = uuid.uuid4().hex
        parts = []
        fields = ({"csrf_token": self.csrf()} if csrf else {}) | fields
        for name, value in fields.items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
        for name, (filename, content) in (files or {}).items():
            head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            parts.append(head.encode() + b"Content-Type: application/octet-stream\r\n\r\n" + content + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        status, _, raw = self.request("POST", path, iter([body]) if chunked else body, headers)
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode()


def new_project(client: Client, model: Path, **fields):
    data = fields.pop("data", ("alpaca.jsonl", SAMPLE.read_bytes()))
    form = {"name": "api-test", "trainer": "sft", "model": str(model), **fields}
    return client.post_form("/api/projects", form, {"data_file": data} if data else None)


def wait_for(client: Client, job_ids: list[int], timeout: float = 240) -> list[dict]:
    deadline = time.time() + timeout
    while True:
        jobs = [client.get_json(f"/api/jobs/{i}")[1] for i in job_ids]
        if all(job["status"] not in ("queued", "running") for job in jobs):
            return jobs
        assert time.time() < deadline, f"jobs still running: {[(j['id'], j['status']) for j in jobs]}"
        time.sleep(0.5)


@pytest.fixture
def model(tiny_llama) -> Path:
    return tiny_llama


@pytest.fixture
def app(tmp_path, model):
    with running_app(tmp_path / "appdata", allowed_paths=[model], max_upload_mb=0.25) as client:
        yield client


# ---- uploads


def test_upload_of_the_wrong_type_is_refused_on_its_field(app, model, tmp_path):
    status, body = new_project(app, model, data=("notes.txt", b"hello"))
    assert status == 400
    assert "notes.txt: .txt files are not data files" in body["errors"]["data_file"]
    assert not list((tmp_path / "appdata" / "uploads").glob("*/*"))  # nothing was written


def test_a_compressed_upload_is_read_like_the_plain_file(app, model):
    import gzip

    _, project = new_project(app, model, data=("alpaca.jsonl.gz", gzip.compress(SAMPLE.read_bytes())))
    mapping = {"prompt_text_column": "instruction", "text_column": "output"}
    status, body = app.post_json(f"/api/projects/{project['id']}/preview", {"mapping": mapping})
    assert status == 200, body
    assert body["columns"] == ["instruction", "input", "output"]
    assert body["plan"]["splits"][0]["examples"] == 175


def test_upload_over_the_limit_is_refused_while_it_streams(app, model, tmp_path):
    big = SAMPLE.read_bytes() * 8  # ~560 KB, limit 256 KB
    status, body = new_project(app, model, data=("big.jsonl", big))
    assert status == 413
    assert "larger than the limit of 0.25 MB" in body["errors"]["data_file"]
    assert not list((tmp_path / "appdata" / "uploads").glob("*/*"))  # the partial file is gone


def test_malformed_rows_name_the_line(app, model):
    rows = b'{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n'
    status, body = new_project(app, model, data=("broken.jsonl", rows))
    assert status == 400
    assert "broken.jsonl line 2" in body["errors"]["data_file"]


def test_missing_data_and_unknown_trainer_are_reported_together(app, model):
    status, body = new_project(app, model, data=None, trainer="magic")
    assert status == 400
    assert set(body["errors"]) == {"trainer", "data_file"}


def test_uploaded_file_names_cannot_escape_the_uploads_folder(app, model, tmp_path):
    status, project = new_project(app, model, data=("../../escape.jsonl", SAMPLE.read_bytes()))
    assert status == 201, project
    stored = Path(project["settings"]["data_path"])
    assert stored.name == "escape.jsonl"
    assert stored.parent.parent == (tmp_path / "appdata" / "uploads").resolve()


# ---- paths typed by the user


@pytest.mark.parametrize("typed", ["../../etc/passwd", "/etc/passwd", "escape-link/passwd"])
def test_paths_outside_the_allowed_folders_are_refused(app, model, tmp_path, typed):
    (tmp_path / "appdata" / "escape-link").symlink_to("/etc")
    status, body = new_project(app, model, data=None, data_path=typed)
    assert status == 403
    assert "outside the folders this app may read" in body["errors"]["data_path"]


def test_a_model_path_outside_the_allowed_folders_is_refused(app, tmp_path):
    status, body = new_project(app, Path("/usr/lib"))
    assert status == 403
    assert "outside the folders" in body["errors"]["model"]


def test_a_path_inside_the_data_folder_is_accepted(app, model, tmp_path):
    (tmp_path / "appdata" / "mine.jsonl").write_bytes(SAMPLE.read_bytes())
    status, project = new_project(app, model, data=None, data_path="mine.jsonl")
    assert status == 201, project
    assert project["settings"]["data_columns"] == ["instruction", "input", "output"]


# ---- CSRF and access


def test_posts_without_the_csrf_token_are_forbidden(app, model):
    status, _ = new_project(app, model)
    assert status == 201
    assert app.post_form("/api/projects", {"name": "x"}, {"data_file": ("a.jsonl", b"{}")}, csrf=False)[0] == 403
    assert app.post_json("/api/projects/1/jobs", {}, csrf=False)[0] == 403
    assert app.post_json("/api/projects/1/jobs", {}, csrf=False, **{"X-CSRF-Token": "forged"})[0] == 403
    status, _, _ = app.request(
        "POST", "/projects/1/data", b"action=next", {"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert status == 403


def test_other_hosts_are_refused_without_a_token(app):
    assert app.request("GET", "/api/jobs", headers={"Host": "evil.example:7860"})[0] == 400
    assert app.request("GET", "/api/jobs", headers={"Host": "localhost:7860"})[0] == 200


def test_a_non_loopback_host_needs_a_token(capsys):
    from tunelab.cli import main

    assert main(["app", "--host", "0.0.0.0", "--port", str(free_port())]) == 2
    assert "--token" in capsys.readouterr().err


def test_with_a_token_every_page_needs_the_login(tmp_path):
    with running_app(tmp_path / "appdata", token="s3cret", start_worker=False) as client:
        status, headers, _ = client.request("GET", "/")
        assert status == 303 and headers["Location"] == "/login"
        assert client.request("GET", "/api/jobs")[0] == 401
        assert client.request("GET", "/api/jobs", headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert client.request("GET", "/api/jobs", headers={"Authorization": "Bearer wrong"})[0] == 401
        client.request("GET", "/login")
        form = f"csrf_token={client.csrf()}&token=wrong".encode()
        urlencoded = {"Content-Type": "application/x-www-form-urlencoded"}
        assert client.request("POST", "/login", form, urlencoded)[0] == 401
        form = f"csrf_token={client.csrf()}&token=s3cret".encode()
        assert client.request("POST", "/login", form, urlencoded)[0] == 303
        assert "s3cret" not in [c.value for c in client.jar]  # the cookie holds a derived value, not the token
        assert client.request("GET", "/")[0] == 200


# ---- parameters


def test_parameter_errors_are_given_per_field(app, model):
    _, project = new_project(app, model)
    status, body = app.post_json(f"/api/projects/{project['id']}/jobs", {"params": {"lr": "fast", "batch_size": 0}})
    assert status == 400
    assert body["errors"]["lr"] == "lr: expected a number, got 'fast'"
    assert body["errors"]["batch_size"] == "batch_size must be positive, got 0"
    assert app.get_json("/api/jobs")[1] == []


def test_chat_template_kwargs_are_a_parameter_of_the_form(app, model):
    """Typed as a JSON object on the form, sent as one (or as its text) through the API; its errors on the field."""
    _, project = new_project(app, model)
    url = f"/api/projects/{project['id']}/preview"
    status, body = app.post_json(url, {"params": {"chat_template_kwargs": "{oops"}})
    assert status == 400 and "not a JSON object" in body["errors"]["chat_template_kwargs"], body
    status, body = app.post_json(url, {"params": {"chat_template_kwargs": {"enable_thinking": False}}})
    assert status == 400 and "never reads enable_thinking" in body["errors"]["chat_template_kwargs"], body
    status, _, page = app.request("GET", f"/projects/{project['id']}/params")
    assert status == 200 and b'name="chat_template_kwargs" value=""' in page


def test_preview_shows_the_examples_as_trained(app, model):
    _, project = new_project(app, model)
    mapping = {"prompt_text_column": "instruction", "text_column": "output"}
    status, body = app.post_json(f"/api/projects/{project['id']}/preview", {"mapping": mapping})
    assert status == 200, body
    assert body["columns"] == ["instruction", "input", "output"]
    assert body["plan"]["splits"][0]["examples"] == 175
    assert "[[" in body["plan"]["examples"][0] and "<|im_start|>assistant" in body["plan"]["examples"][0]
    status, body = app.post_json(f"/api/projects/{project['id']}/preview", {"mapping": {"text_column": "nope"}})
    assert status == 400 and "not a column" in body["errors"]["text_column"]


# ---- jobs


SHORT_RUN = {"max_steps": 2, "batch_size": 2, "gradient_accumulation": 1, "block_size": 128, "logging_steps": 1}


def test_jobs_run_one_after_the_other_and_survive_a_restart(tmp_path, model):
    from tunelab.app.jobs import JobStore

    data_dir = tmp_path / "appdata"
    with running_app(data_dir, allowed_paths=[model]) as client:
        _, project = new_project(client, model)
        url = f"/api/projects/{project['id']}/jobs"
        status, first = client.post_json(url, {"params": SHORT_RUN, "evaluate": True, "token": "hf_secret"})
        assert status == 201, first
        status, second = client.post_json(url, {"params": SHORT_RUN, "evaluate": False})
        assert status == 201, second
        first, second = wait_for(client, [first["id"], second["id"]])
        assert (first["status"], second["status"]) == ("completed", "completed"), (first, second)
        assert second["started"] >= first["finished"]  # one device, one job at a time
        assert first["metrics"]["train_loss"] > 0
        assert first["evaluation"]["results"]["eval_loss"] > 0 and second["evaluation"] is None
        assert first["params"]["token"] == "set" and second["params"]["token"] is None
        config = (Path(first["folder"]) / "config.yaml").read_text()
        assert "hf_secret" not in config and "hf_secret" not in (data_dir / "app.db").read_bytes().decode("latin-1")

        metrics = client.get_json(f"/api/jobs/{first['id']}/metrics")[1]
        assert [step for step, _ in metrics["points"]["loss"]] == [1, 2]
        log = client.get_json(f"/api/jobs/{first['id']}/log")[1]
        assert "tunelab: done" in log["text"]
        status, reply = client.post_json(f"/api/jobs/{first['id']}/chat", {"message": "Name three colors."})
        assert status == 200 and reply["answer"].strip()  # sampled: a barely trained model says something
        status, headers, archive = client.request("GET", f"/jobs/{first['id']}/download")
        assert status == 200 and archive[:2] == b"PK" and b"adapter_config.json" in archive
        _export_for_ollama(client, first["id"])
        listed = client.get_json("/api/jobs")[1]

    # A job the app was running when it died: found "running" at the next start, it becomes "interrupted".
    store = JobStore(data_dir / "app.db")
    ghost = store.add_job(project["id"], "ghost", {"trainer": "sft"}, data_dir / "jobs" / "ghost", False)
    store.next_queued()
    with running_app(data_dir, allowed_paths=[model], start_worker=False) as client:
        after = client.get_json("/api/jobs")[1]
        assert [(j["id"], j["status"]) for j in after[1:]] == [(j["id"], j["status"]) for j in listed]
        assert after[0]["id"] == ghost and after[0]["status"] == "interrupted"
        status, _, page = client.request("GET", "/")
        assert status == 200 and b"api-test #1" in page and b"api-test #2" in page


def _export_for_ollama(client: Client, job_id: int) -> None:
    """The job page's Export button: the GGUF file and a Modelfile with the run's template, to download."""
    assert client.post_json(f"/api/jobs/{job_id}/export", {"dtype": "q2_k"})[0] == 400
    status, started = client.post_json(f"/api/jobs/{job_id}/export", {"dtype": "f16"})
    assert status == 202 and started["state"] in ("running", "done")
    deadline = time.time() + 120
    while (state := client.get_json(f"/api/jobs/{job_id}/export")[1])["state"] == "running":
        assert time.time() < deadline
        time.sleep(0.2)
    assert state["state"] == "done", state
    files = {file["name"]: file["url"] for file in state["files"]}
    modelfile = client.request("GET", files["Modelfile"])[2].decode()
    assert modelfile.startswith("FROM ./model.gguf") and "### Instruction:" in modelfile  # the run's Alpaca template
    assert client.request("GET", files["model.gguf"])[2][:4] == b"GGUF"
    assert client.request("GET", f"/jobs/{job_id}/export/..%2Fconfig.yaml")[0] == 404


def test_cancel_stops_the_running_job_and_a_queued_one(app, model):
    _, project = new_project(app, model)
    url = f"/api/projects/{project['id']}/jobs"
    running = app.post_json(url, {"params": {**SHORT_RUN, "max_steps": 200}, "evaluate": False})[1]
    queued = app.post_json(url, {"params": SHORT_RUN, "evaluate": False})[1]
    deadline = time.time() + 30
    while app.get_json(f"/api/jobs/{running['id']}")[1]["status"] != "running":
        assert time.time() < deadline
        time.sleep(0.1)
    assert app.post_json(f"/api/jobs/{queued['id']}/cancel", {})[1] == {"cancelled": True}
    assert app.post_json(f"/api/jobs/{running['id']}/cancel", {})[1] == {"cancelled": True}
    running, queued = wait_for(app, [running["id"], queued["id"]], timeout=60)
    assert (running["status"], queued["status"]) == ("cancelled", "cancelled")
    assert queued["started"] is None and running["started"] is not None


def test_the_html_form_shows_the_error_beside_its_field(app, model):
    status, page = app.post_form("/projects", {"name": "p", "model": str(model)}, {"data_file": ("x.exe", b"MZ")})
    assert status == 400
    assert '<p class="error" data-field="data_file">x.exe: .exe files are not data files' in page
    status, page = app.post_form("/projects", {"name": "p", "model": str(model)}, {"data_file": ("a.jsonl", b"{oops")})
    assert status == 400 and "x.exe" not in page and "a.jsonl line 1" in page


def test_a_grpo_job_shows_its_sample_completions(app, model):
    rows = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(4)]
    data = ("prompts.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    status, project = new_project(app, model, trainer="grpo", data=data)
    assert status == 201, project
    # the parameters page: the common settings, then grpo's own under their heading (after the common ones)
    status, _, page = app.request("GET", f"/projects/{project['id']}/params")
    text = page.decode()
    assert status == 200 and "grpo's own settings" in text
    heading, after = text.index('id="method-settings"'), text.index('id="publish-settings"')
    assert text.index('id="lr"') < heading < text.index('id="loss_type"') < after < text.index('id="push_to_hub"')
    params = {**SHORT_RUN, "reward_functions": "format_tag,answer_last_number", "num_generations": 2}
    params |= {"max_completion_length": 4, "completions_every": 1}
    status, job = app.post_json(f"/api/projects/{project['id']}/jobs", {"params": params, "evaluate": False})
    assert status == 201, job
    (job,) = wait_for(app, [job["id"]])
    assert job["status"] == "completed", job
    samples = app.get_json(f"/api/jobs/{job['id']}/completions")[1]["samples"]
    assert samples and samples[0]["step"] == 2 and samples[-1]["step"] == 1  # newest first
    assert set(samples[0]["rewards"]) == {"format_tag", "answer_last_number"}
    status, _, page = app.request("GET", f"/jobs/{job['id']}")
    assert status == 200 and b'id="completions"' in page


def test_a_chat_template_file_or_jinja_is_refused_by_the_app(app, model, tmp_path):
    """The CLI takes a template file's path or the Jinja itself; the app takes template names only: it reads no
    file a project names outside its allowed folders (a path there would render any file into the preview)."""
    _, project = new_project(app, model)
    secret = tmp_path / "outside.jinja"
    secret.write_text("{{ 'not yours' }}")
    for value in (str(secret), "{{ messages[0]['content'] }}"):
        status, body = app.post_json(f"/api/projects/{project['id']}/preview", {"mapping": {"chat_template": value}})
        assert status == 400 and "is not one of none, zephyr, chatml" in body["errors"]["chat_template"], body
