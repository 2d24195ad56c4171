"""push_to_hub against a fake hub on loopback: what is uploaded, private by default, and the token kept secret.

The real hub is out of reach in tests, so a small HTTP server on 127.0.0.1 answers just enough of the hub API for
huggingface_hub's `create_repo` and `upload_folder` (every file in "regular" mode, so its content comes inline in
the commit) and records every request. huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE when imported, so
the runs happen in a subprocess pointed at the fake hub.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

TOKEN = "hf_fakeTokenForTests123"
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeHub:
    """Records every request; `create_status` other than 200 makes repo creation fail with that status."""

    url: str = ""
    create_status: int = 200
    requests: list[Request] = field(default_factory=list)

    def paths(self) -> list[str]:
        return [f"{r.method} {r.path}" for r in self.requests]

    def find(self, method: str, suffix: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path.split("?")[0].endswith(suffix)]

    def committed_files(self) -> dict[str, bytes]:
        """path -> content of every file in every commit (NDJSON: a header line, then one line per file)."""
        files = {}
        for commit in self.find("POST", "/commit/main"):
            for line in commit.body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        return files


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep the test output quiet
            pass

        def _answer(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _record(self) -> Request:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            request = Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            hub.requests.append(request)
            return request

        def do_GET(self) -> None:
            self._record()
            self._answer(404, {"error": "Repository not found"})  # the fake hub holds no repos to read

        def do_POST(self) -> None:
            request = self._record()
            path = request.path.split("?")[0]
            if path == "/api/repos/create":
                if hub.create_status != 200:  # quoting the request back, as error pages may
                    sent = self.headers.get("Authorization")
                    self._answer(hub.create_status, {"error": f"refused ({hub.create_status}) for {sent}"})
                    return
                payload = json.loads(request.body)
                repo = f"{payload['organization']}/{payload['name']}"
                self._answer(200, {"url": f"{hub.url}/{repo}", "name": repo})
            elif path == "/api/validate-yaml":
                self._answer(200, {"errors": [], "warnings": []})
            elif "/preupload/" in path:
                files = json.loads(request.body)["files"]
                modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                self._answer(200, {"files": modes})
            elif "/commit/" in path:
                repo = path.removeprefix("/api/models/").split("/commit/")[0]
                self._answer(200, {"commitUrl": f"{hub.url}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40})
            else:
                self._answer(404, {"error": f"not in the fake hub: {path}"})

    return Handler


@pytest.fixture
def fake_hub():
    hub = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield hub
    server.shutdown()
    server.server_close()


def _env(hub: FakeHub, tmp_path: Path) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "TRANSFORMERS_OFFLINE")
    }
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HUB_OFFLINE="0",
        HF_HOME=str(tmp_path / "hf-home"),  # no token saved by `hf auth login` on this machine is picked up
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def _train_and_push(hub: FakeHub, model: Path, project: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "tunelab.cli", "llm", "--train",
        "--model", str(model), "--data-path", str(ROOT / "samples" / "alpaca.jsonl"),
        "--trainer", "sft", "--peft", "--lora-r", "4", "--max-steps", "2",
        "--block-size", "128", "--model-max-length", "256", "--batch-size", "2", "--gradient-accumulation", "1",
        "--project-name", str(project), "--push-to-hub", "--username", "someone", "--token", TOKEN,
    ]  # fmt: skip
    env = _env(hub, project.parent)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=project.parent)


def _files_with_token(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]


def test_push_uploads_the_run_privately_and_keeps_the_token_secret(tiny_llama, tmp_path, fake_hub):
    project = tmp_path / "run"
    result = _train_and_push(fake_hub, tiny_llama, project)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert f"pushed to {fake_hub.url}/someone/run" in result.stderr

    (create,) = fake_hub.find("POST", "/api/repos/create")
    payload = json.loads(create.body)
    assert (payload["organization"], payload["name"], payload["visibility"]) == ("someone", "run", "private")
    writes = [create, *fake_hub.find("POST", "/preupload/main"), *fake_hub.find("POST", "/commit/main")]
    assert [r.path for r in writes] == [
        "/api/repos/create",
        "/api/models/someone/run/preupload/main",
        "/api/models/someone/run/commit/main",
    ]

    files = fake_hub.committed_files()
    expected = {
        "adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
        "training_params.json", "metrics.jsonl", "README.md", "tunelab_run.json",
    }  # fmt: skip
    assert expected <= set(files), sorted(files)
    assert not [p for p in files if p.startswith(("checkpoint-", "runs/"))], sorted(files)
    assert files["adapter_model.safetensors"] == (project / "adapter_model.safetensors").read_bytes()

    # The hub authenticates by the Authorization header: the token goes there on every write, and nowhere else.
    for request in writes:
        assert request.headers.get("authorization") == f"Bearer {TOKEN}", request.path
    for request in fake_hub.requests:  # huggingface_hub also GETs /api/agent-harnesses, without a token
        assert request.headers.get("authorization") in (None, f"Bearer {TOKEN}"), request.path
        assert TOKEN.encode() not in request.body and TOKEN not in request.path, request.path
    assert not [p for p, content in files.items() if TOKEN.encode() in content]
    assert TOKEN not in output
    assert _files_with_token(project) == []


def test_refused_push_fails_the_run_with_one_clear_error(tiny_llama, tmp_path, fake_hub):
    # The fake hub answers 401 and quotes the Authorization header back: the message must not carry the token.
    fake_hub.create_status = 401
    project = tmp_path / "run"
    result = _train_and_push(fake_hub, tiny_llama, project)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"tunelab: error: push to someone/run at {fake_hub.url} failed: 401 Unauthorized: refused (401) for "
        "Bearer *** (check that the token is valid and may write to this namespace). The run itself is complete in "
        f"{project}; upload it later with `hf upload someone/run {project} --private` (huggingface_hub's CLI)"
    )
    assert "Traceback" not in output and TOKEN not in output
    assert (project / "tunelab_run.json").is_file()  # the run itself is kept, complete
    assert _files_with_token(project) == []
    assert not fake_hub.find("POST", "/preupload/main") and not fake_hub.find("POST", "/commit/main")


def _push(hub: FakeHub, tmp_path: Path, folder: Path, private: bool = True) -> subprocess.CompletedProcess:
    """push_folder as a finished run calls it, without training first (in a subprocess: see the module doc)."""
    script = (
        "from tunelab.hub import push_folder; "
        f"print(push_folder({str(folder)!r}, 'someone/done', {TOKEN!r}, private={private}))"
    )
    env = _env(hub, tmp_path)
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)


def _run_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "done"
    for name in ("adapter_config.json", "checkpoint-1/optimizer.pt", "runs/events.out.tfevents.1"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("{}")
    return folder


def test_push_leaves_checkpoints_and_events_behind_and_can_be_public(tmp_path, fake_hub):
    result = _push(fake_hub, tmp_path, _run_folder(tmp_path), private=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{fake_hub.url}/someone/done"
    assert set(fake_hub.committed_files()) == {"adapter_config.json"}
    (create,) = fake_hub.find("POST", "/api/repos/create")
    assert json.loads(create.body)["visibility"] == "public"


def test_hub_server_error_is_reported_without_the_token(tmp_path, fake_hub):
    fake_hub.create_status = 500
    result = _push(fake_hub, tmp_path, _run_folder(tmp_path))
    error = result.stderr.strip().splitlines()[-1]
    assert error == (
        f"tunelab.errors.TunelabError: push to someone/done at {fake_hub.url} failed: "
        "500 Internal Server Error: refused (500) for Bearer ***"
    )
    assert TOKEN not in result.stdout + result.stderr
    assert not fake_hub.find("POST", "/commit/main")


def test_push_without_a_token_says_where_to_put_one(tmp_path, monkeypatch):
    from tunelab.errors import TunelabError
    from tunelab.hub import push_folder

    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(TunelabError, match="--token, hub.token in the config, or HF_TOKEN"):
        push_folder(str(tmp_path), "someone/run", None)
