"""The web app's tasks and tools beyond one LLM run, through its API on a real server: a text-classification project
(label counts, per-class metrics, confusion matrix, predict), runs compared (overlaid curves, the parameters that
differ), base beside tuned, the merged export and a new project from it, "run again", the machine panel, a queued
job's token across a restart (sealed, never in clear), and the security cases of every new route."""

from __future__ import annotations

import html
import io
import json
import re
import shutil
import time
import zipfile
from pathlib import Path

import gguf
import pytest

from tests.conftest import SHARED_DATA
from tests.test_app_api import SHORT_RUN, new_project, running_app, wait_for

pytest.importorskip("fastapi")

TWEETS = SHARED_DATA / "sentiment"
needs_tweets = pytest.mark.skipif(not TWEETS.is_dir(), reason="../shared/data/sentiment is not beside the clone")


def head(path: Path, rows: int) -> bytes:
    """The header and the first `rows` rows of a CSV file (the tweets hold no newlines inside a field)."""
    return "".join(path.read_text(encoding="utf-8").splitlines(keepends=True)[: rows + 1]).encode()


@pytest.fixture
def app(tmp_path, tiny_llama):
    with running_app(tmp_path / "appdata", allowed_paths=[tiny_llama]) as client:
        yield client


# ---- text classification


@needs_tweets
def test_text_classification_project_trains_shows_its_classes_and_predicts(app, tiny_llama):
    files = {"data_file": ("train.csv", head(TWEETS / "train.csv", 160))}
    files["valid_file"] = ("valid.csv", head(TWEETS / "valid.csv", 60))
    fields = {"name": "tweets", "trainer": "text_classification", "model": str(tiny_llama)}
    status, project = app.post_form("/api/projects", fields, files)
    assert status == 201, project
    # The label column is found by its name (the tweets call it "label", the schema's default is "target").
    assert (project["settings"]["text_column"], project["settings"]["target_column"]) == ("text", "label")

    status, shown = app.post_json(f"/api/projects/{project['id']}/preview", {"params": {"max_seq_length": 64}})
    assert status == 200, shown
    counts = shown["plan"]["label_counts"]
    assert set(counts) == {"train", "valid"} and set(counts["train"]) == {"negative", "neutral", "positive"}
    assert sum(counts["train"].values()) == 160 and sum(counts["valid"].values()) == 60
    status, page = app.request("GET", f"/projects/{project['id']}/data")[::2]
    assert status == 200 and b'id="label-counts"' in page and b"target_column" in page
    status, page = app.request("GET", f"/projects/{project['id']}/params")[::2]
    assert b'id="max_seq_length"' in page and b'id="block_size"' not in page  # the classifier's own form

    params = {"max_steps": 6, "batch_size": 8, "max_seq_length": 64, "logging_steps": 1, "lr": 1e-3}
    status, job = app.post_json(f"/api/projects/{project['id']}/jobs", {"params": params})
    assert status == 201, job
    (job,) = wait_for(app, [job["id"]])
    assert job["status"] == "completed", job["message"]
    config = (Path(job["folder"]) / "config.yaml").read_text()
    assert config.startswith("task: text_classification")

    result = job["classification"]
    assert result["labels"] == ["negative", "neutral", "positive"]
    assert sum(cell["count"] for row in result["matrix"] for cell in row) == 60  # every validation text, once
    diagonal = sum(result["matrix"][i][i]["count"] for i in range(3))
    assert result["accuracy"] == pytest.approx(diagonal / 60, abs=1e-4)
    assert [c["label"] for c in result["per_class"]] == result["labels"]
    assert sum(c["support"] for c in result["per_class"]) == 60
    status, page = app.request("GET", f"/jobs/{job['id']}")[::2]
    assert b'id="confusion"' in page and b'id="predict-form"' in page and b'id="chat-form"' not in page

    status, predicted = app.post_json(f"/api/jobs/{job['id']}/predict", {"text": "I love this, best day ever!"})
    assert status == 200, predicted
    probabilities = {p["label"]: p["p"] for p in predicted["probabilities"]}
    assert set(probabilities) == set(result["labels"]) and sum(probabilities.values()) == pytest.approx(1, abs=1e-4)
    assert predicted["label"] == max(probabilities, key=probabilities.get)
    assert app.post_json(f"/api/jobs/{job['id']}/predict", {"text": "  "})[0] == 400
    assert app.post_json(f"/api/jobs/{job['id']}/chat", {"message": "hi"})[0] == 409
    assert app.post_json(f"/api/jobs/{job['id']}/export", {"kind": "gguf", "dtype": "f16"})[0] == 409
    charts = {c["id"] for c in app.get_json(f"/api/jobs/{job['id']}/metrics")[1]["charts"]}
    assert {"loss", "lr", "grad_norm", "memory", "accuracy"} <= charts


# ---- LLM runs: compared, base beside tuned, merged, run again


def test_two_runs_compared_base_beside_tuned_merged_and_run_again(app, tiny_llama, tmp_path):
    _, project = new_project(app, tiny_llama)
    url = f"/api/projects/{project['id']}/jobs"
    run = {**SHORT_RUN, "max_steps": 3}
    ids = [app.post_json(url, {"params": {**run, "lr": lr}, "evaluate": False})[1]["id"] for lr in (2e-4, 1e-3)]
    jobs = wait_for(app, ids)
    assert [job["status"] for job in jobs] == ["completed", "completed"], [job["message"] for job in jobs]

    status, compared = app.get_json(f"/api/compare?jobs={ids[0]},{ids[1]}")
    assert status == 200
    assert [row["name"] for row in compared["params"]] == ["lr"]  # the only difference, and it is found
    assert [row["values"] for row in compared["params"]] == [[2e-4, 1e-3]]
    loss = next(chart for chart in compared["charts"] if chart["id"] == "loss")
    assert set(loss["series"]) == {f"#{ids[0]}: loss", f"#{ids[1]}: loss"}
    assert all(len(points) == 3 for points in loss["series"].values())
    lr_chart = next(chart for chart in compared["charts"] if chart["id"] == "lr")
    assert len(lr_chart["series"]) == 2
    assert {"train_loss"} <= {row["name"] for row in compared["metrics"]}
    status, page = app.request("GET", f"/compare?jobs={ids[0]}&jobs={ids[1]}")[::2]
    assert status == 200 and b'data-param="lr"' in page and b'data-param="epochs"' not in page
    assert app.request("GET", "/compare?jobs=1,x")[0] == 400

    # Every run's metrics carry its throughput and memory (the charts beyond the loss).
    records = [json.loads(line) for line in (Path(jobs[0]["folder"]) / "run" / "metrics.jsonl").open()]
    trained = [r for r in records if "loss" in r]
    assert all(r["peak_memory_gib"] > 0 for r in trained)
    assert all(r["trained_tokens_per_second"] > 0 for r in trained[1:])  # from the second record on

    # Base beside tuned, greedy: the base's answer is the base model's own, generated here apart.
    status, both = app.post_json(f"/api/jobs/{ids[1]}/side-by-side", {"message": "Name a colour.", "sample": False})
    assert status == 200, both
    assert both["base"] == _greedy_answer(tiny_llama, "Name a colour.")
    assert app.post_json(f"/api/jobs/{ids[1]}/side-by-side", {"message": ""})[0] == 400

    # The merged model, downloadable, and a new project that starts from it.
    status, started = app.post_json(f"/api/jobs/{ids[1]}/export", {"kind": "merged"})
    assert status == 202, started
    deadline = time.time() + 120
    while (state := app.get_json(f"/api/jobs/{ids[1]}/export?kind=merged")[1])["state"] == "running":
        assert time.time() < deadline
        time.sleep(0.2)
    assert state["state"] == "done", state
    status, _, archive = app.request("GET", state["files"][0]["url"])
    names = zipfile.ZipFile(io.BytesIO(archive)).namelist()
    assert status == 200 and "config.json" in names and any(n.endswith(".safetensors") for n in names)
    # The adapter alone as llama.cpp's adapter file, downloadable.
    assert app.post_json(f"/api/jobs/{ids[1]}/export", {"kind": "adapter"})[0] == 202
    while (state_adapter := app.get_json(f"/api/jobs/{ids[1]}/export?kind=adapter")[1])["state"] == "running":
        assert time.time() < deadline
        time.sleep(0.2)
    assert state_adapter["state"] == "done", state_adapter
    assert [file["name"] for file in state_adapter["files"]] == ["adapter.gguf"]
    status, _, adapter = app.request("GET", state_adapter["files"][0]["url"])
    (tmp_path / "adapter.gguf").write_bytes(adapter)
    fields = gguf.GGUFReader(tmp_path / "adapter.gguf").fields
    assert status == 200 and fields["general.type"].contents() == "adapter"
    assert fields["adapter.type"].contents() == "lora"
    status, page = app.request("GET", f"/jobs/{ids[1]}")[::2]
    assert b'id="new-from-run"' in page and b'id="run-again"' in page and b'id="adapter-form"' in page
    status, continued = new_project(app, Path(state["folder"]), name="continued")
    assert status == 201 and continued["settings"]["model"] == state["folder"]

    # Run again: the form filled with that job's parameters.
    status, page = app.request("GET", f"/projects/{project['id']}/params?from_job={ids[1]}")[::2]
    assert status == 200 and b'id="lr" name="lr" value="0.001"' in page


def test_run_again_shows_a_job_s_object_and_list_parameters_as_the_text_its_fields_take(tiny_llama, tmp_path):
    """chat_template_kwargs, an object in the job's parameters, fills the "run again" form as JSON text, and
    add_tokens, a list, as comma-separated text, which the form then sends back as valid parameters."""
    model = tmp_path / "brief-model"  # its template reads a variable of its own
    shutil.copytree(tiny_llama, model)
    chatml = (model / "chat_template.jinja").read_text()
    (model / "chat_template.jinja").write_text("{% if brief %}{% endif %}" + chatml)
    with running_app(tmp_path / "appdata", allowed_paths=[model]) as app:
        _, project = new_project(app, model)
        mapping = {"chat_template": "tokenizer"}  # the model's own template, not the Alpaca rows' detected one
        assert app.post_json(f"/api/projects/{project['id']}/preview", {"mapping": mapping})[0] == 200
        params = {**SHORT_RUN, "max_steps": 1, "chat_template_kwargs": {"brief": True}, "add_tokens": ["<a>", "<b>"]}
        status, job = app.post_json(f"/api/projects/{project['id']}/jobs", {"params": params, "evaluate": False})
        assert status == 201, job
        (done,) = wait_for(app, [job["id"]])
        assert done["status"] == "completed", done["message"]
        status, page = app.request("GET", f"/projects/{project['id']}/params?from_job={job['id']}")[::2]
        assert status == 200 and b'name="chat_template_kwargs" value="{&#34;brief&#34;: true}"' in page
        assert b'name="add_tokens" value="&lt;a&gt;,&lt;b&gt;"' in page  # a list, as the field's text
        again = {**SHORT_RUN, "chat_template_kwargs": '{"brief": true}', "add_tokens": "<a>,<b>"}  # as the form sends
        status, body = app.post_json(f"/api/projects/{project['id']}/preview", {"params": again})
        assert status == 200, body


def test_run_again_carries_the_parameters_set_outside_the_form(app, tiny_llama):
    """A job given target_modules and lora_rank_pattern through the API (no field of the form): "run again" lists
    them, sends them back, and the new job has them; what the page did not write is dropped, not trusted."""
    _, project = new_project(app, tiny_llama)
    outside_form = {"target_modules": "q_proj,v_proj", "lora_rank_pattern": "q_proj=8"}
    params = {**SHORT_RUN, "max_steps": 1, **outside_form}
    status, job = app.post_json(f"/api/projects/{project['id']}/jobs", {"params": params, "evaluate": False})
    assert status == 201, job
    wait_for(app, [job["id"]])
    url = f"/projects/{project['id']}/params"
    page = app.request("GET", f"{url}?from_job={job['id']}")[2].decode()
    assert 'id="carried"' in page and "<code>target_modules: q_proj,v_proj</code>" in page
    carried = html.unescape(re.search(r'name="carried" value="([^"]*)"', page).group(1))
    assert json.loads(carried) == outside_form  # the form's own fields are filled, not carried
    form = {k: str(v) for k, v in SHORT_RUN.items()} | {"peft": "on", "lr": "0.0002", "max_steps": "1"}
    assert app.post_form(url, {**form, "carried": carried, "action": "start"})[0] == 303
    again = next(j for j in app.get_json("/api/jobs")[1] if j["id"] != job["id"])
    assert {k: again["params"][k] for k in outside_form} == outside_form
    wait_for(app, [again["id"]])

    sneaked = json.dumps({"project_name": "/tmp/elsewhere", "cache_dir": "/tmp/cache", "lr": 5})
    status, page = app.post_form(url, {**form, "carried": sneaked, "action": "check"})
    assert status == 200 and "/tmp/elsewhere" not in page and 'id="carried"' not in page
    status, page = app.post_form(url, {**form, "carried": "{oops", "action": "check"})
    assert status == 400 and "the carried parameters are not a JSON object" in page


def test_a_dpo_job_ends_with_its_preference_evaluation_on_its_page(app, tiny_llama):
    """The app evaluates a preference run too: on the pairs its valid_size held out, its figures and samples with
    the pair's chosen and rejected answers on the job page."""
    rows = [
        {"prompt": f"Question {n}?", "chosen": " The answer is blue.", "rejected": f" It is {n % 5} pm."}
        for n in range(12)
    ]
    data = ("pairs.jsonl", "".join(json.dumps(row) + "\n" for row in rows).encode())
    status, project = new_project(app, tiny_llama, name="pairs", trainer="dpo", data=data)
    assert status == 201, project
    params = {**SHORT_RUN, "block_size": 64, "max_prompt_length": 32, "valid_size": 4, "eval_strategy": "no"}
    status, job = app.post_json(f"/api/projects/{project['id']}/jobs", {"params": params, "evaluate": True})
    assert status == 201, job
    (job,) = wait_for(app, [job["id"]])
    assert job["status"] == "completed", job["message"]

    results = job["evaluation"]["results"]
    assert results["method"] == "dpo" and results["rows"] == 4 and results["unit"] == "pairs"
    assert results["data"].startswith("4 of the 12 examples of ") and "held out by valid_size=4" in results["data"]
    assert {"rewards/accuracies", "rewards/margins", "logps/chosen"} <= set(results)
    held = {sample["prompt"] for sample in results["samples"]}
    assert len(held) == 2 and held <= {row["prompt"] for row in rows}

    status, page = app.request("GET", f"/jobs/{job['id']}")[::2]
    page = page.decode()
    assert status == 200 and "<th>rewards/accuracies</th>" in page and "<th>rewards/margins</th>" in page
    assert "4 of the 12 examples of pairs.jsonl, held out" in page  # the upload's folder left out
    cards = page.split('class="sample card"')[1:]
    assert len(cards) == 2
    for card, sample in zip(cards, results["samples"], strict=True):
        assert '<p class="label">Chosen</p><pre class="reference">The answer is blue.</pre>' in card
        assert f'<p class="label">Rejected</p><pre class="rejected">{sample["rejected"]}</pre>' in card
        assert sample["rejected"].startswith("It is") and 'class="base"' in card


def _greedy_answer(model_dir: Path, message: str) -> str:
    from tunelab.inference.chat import ChatSession
    from tunelab.inference.generate import GenerationParams, load_run

    model, tokenizer = load_run(model_dir)
    return ChatSession(model, tokenizer, GenerationParams(128)).send(message)


# ---- the machine, and a queued job's token across a restart


def test_the_machine_panel_reports_the_disk_where_runs_are_written(app, tmp_path):
    status, machine = app.get_json("/api/machine")
    assert status == 200 and machine["device"]
    free = shutil.disk_usage(tmp_path).free
    assert abs(machine["disk_free_bytes"] - free) < 2**30  # the same disk, give or take what others wrote
    assert machine["ram_total_bytes"] > machine["ram_available_bytes"] > 0
    page = app.request("GET", "/")[2]
    assert b'id="machine"' in page  # on every page: the panel is in the base template


def test_a_queued_job_keeps_its_token_sealed_across_a_restart(tmp_path, tiny_llama):
    data_dir = tmp_path / "appdata"
    hub = {"push_to_hub": True, "repo_id": "someone/tiny"}
    with running_app(data_dir, allowed_paths=[tiny_llama], start_worker=False) as client:
        _, project = new_project(client, tiny_llama)
        url = f"/api/projects/{project['id']}/jobs"
        status, job = client.post_json(url, {"params": {**SHORT_RUN, **hub}, "token": "hf_sealed_secret"})
        assert status == 201, job
        status, refused = client.post_json(url, {"params": {**SHORT_RUN, **hub}})
        assert status == 400 and "token" in json.dumps(refused)  # known before queueing, not after training
    database = (data_dir / "app.db").read_bytes()
    assert b"hf_sealed_secret" not in database and job["has_token"]
    assert b"hf_sealed_secret" not in b"".join(p.read_bytes() for p in data_dir.rglob("*") if p.is_file())

    # The app comes back: the job is still queued, then runs with its token (the run reaches the push, which
    # fails only because the hub is out of reach here: without the token it would have stopped at its checks).
    with running_app(data_dir, allowed_paths=[tiny_llama]) as client:
        (done,) = wait_for(client, [job["id"]])
    log = (Path(done["folder"]) / "train.log").read_text()
    assert "tunelab: done" in log or "training" in log
    assert "needs a token" not in log and "hf_sealed_secret" not in log
    assert done["status"] == "failed" and "out of reach" in done["message"], done["message"]
    assert done["has_token"]  # a failed job may resume: its token stays sealed until it completes or is cancelled


# ---- security of the new routes


def test_new_routes_refuse_forgeries_foreign_hosts_and_paths_outside(app, tiny_llama, tmp_path):
    _, project = new_project(app, tiny_llama)
    status, job = app.post_json(f"/api/projects/{project['id']}/jobs", {"params": SHORT_RUN, "evaluate": False})
    for route, body in (
        ("side-by-side", {"message": "hi"}),
        ("predict", {"text": "hi"}),
        ("export", {"kind": "merged"}),
        ("push", {"repo_id": "a/b", "token": "x"}),
    ):
        assert app.post_json(f"/api/jobs/{job['id']}/{route}", body, csrf=False)[0] == 403, route
        forged = app.post_json(f"/api/jobs/{job['id']}/{route}", body, csrf=False, **{"X-CSRF-Token": "guess"})
        assert forged[0] == 403, route
    for path in ("/api/machine", f"/api/compare?jobs={job['id']}", f"/compare?jobs={job['id']}"):
        assert app.request("GET", path, headers={"Host": "evil.example:7860"})[0] == 400, path
    assert app.request("GET", f"/jobs/{job['id']}/export/..%2F..%2Fapp.db")[0] == 404
    assert app.request("GET", f"/jobs/{job['id']}/export/merged.zip")[0] == 404  # nothing merged yet
    for name, value in (("data_path", "/etc/passwd"), ("project_name", str(tmp_path / "anywhere")), ("task", "x")):
        status, refused = app.post_json(f"/api/projects/{project['id']}/jobs", {"params": {name: value}})
        assert status == 400 and "set by the project" in refused["errors"][name], (name, refused)
        status, refused = app.post_json(f"/api/projects/{project['id']}/preview", {"params": {name: value}})
        assert status == 400 and name in refused["errors"], (name, refused)
    assert app.post_json(f"/api/projects/{project['id']}/preview", {"mapping": ["x"]})[0] == 400
    assert app.post_json(f"/api/projects/{project['id']}/jobs", {"token": 123})[0] == 400
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    status, refused = new_project(app, outside)  # "new project from this run" with a model outside the roots
    assert status == 403 and "outside" in refused["errors"]["model"]
    wait_for(app, [job["id"]])


def test_an_oversized_classification_upload_is_refused_while_it_streams(tmp_path, tiny_llama):
    with running_app(tmp_path / "appdata", allowed_paths=[tiny_llama], max_upload_mb=0.01) as client:
        big = b"text,label\n" + b"a long enough tweet,positive\n" * 2000
        fields = {"trainer": "text_classification", "model": str(tiny_llama)}
        status, refused = client.post_form("/api/projects", fields, {"data_file": ("t.csv", big)})
        assert status == 413 and "limit" in refused["errors"]["data_file"]
        assert not any((tmp_path / "appdata" / "uploads").rglob("t.csv"))


def test_start_asks_first_when_the_plan_does_not_fit(app, tiny_llama, monkeypatch):
    import tunelab.memory

    monkeypatch.setattr(tunelab.memory, "available_memory", lambda device=None: ("a tiny device", 2**20))
    _, project = new_project(app, tiny_llama)
    form = {k: str(v) for k, v in SHORT_RUN.items()} | {"peft": "on", "lr": "0.0002"}
    status, page = app.post_form(f"/projects/{project['id']}/params", {**form, "action": "start"})
    assert status == 200 and 'id="unfit"' in page and 'id="start-anyway"' in page and "DOES NOT FIT" in page
    assert app.get_json("/api/jobs")[1] == []  # nothing queued
    status, _ = app.post_form(f"/projects/{project['id']}/params", {**form, "action": "start_anyway"})
    assert status == 303
    (job,) = app.get_json("/api/jobs")[1]
    wait_for(app, [job["id"]])


def test_a_push_without_the_hub_fails_in_one_line_and_never_shows_the_token(app, tiny_llama, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub out of reach, as on this machine
    _, project = new_project(app, tiny_llama)
    _, job = app.post_json(f"/api/projects/{project['id']}/jobs", {"params": SHORT_RUN, "evaluate": False})
    (job,) = wait_for(app, [job["id"]])
    assert app.post_json(f"/api/jobs/{job['id']}/push", {"repo_id": "no-slash", "token": "x"})[0] == 400
    status, started = app.post_json(f"/api/jobs/{job['id']}/push", {"repo_id": "me/tiny", "token": "hf_push_only"})
    assert status == 202 and "token" not in started
    deadline = time.time() + 30
    while (state := app.get_json(f"/api/jobs/{job['id']}/export?kind=push")[1])["state"] == "running":
        assert time.time() < deadline
        time.sleep(0.1)
    assert state["state"] == "failed" and "out of reach" in state["error"]
    assert "hf_push_only" not in json.dumps(state)


def test_the_parameters_page_queues_a_push_job_with_its_token(tmp_path, tiny_llama):
    with running_app(tmp_path / "appdata", allowed_paths=[tiny_llama], start_worker=False) as client:
        _, project = new_project(client, tiny_llama)
        form = {k: str(v) for k, v in SHORT_RUN.items()} | {"peft": "on", "lr": "0.0002", "push_to_hub": "on"}
        form |= {"repo_id": "me/tiny", "action": "start"}
        status, page = client.post_form(f"/projects/{project['id']}/params", form)
        assert status == 400 and "needs a token" in page  # without one: said on the page, nothing queued
        assert "Type it again" not in page
        status, _ = client.post_form(f"/projects/{project['id']}/params", {**form, "token": "hf_from_the_page"})
        assert status == 303
        (job,) = client.get_json("/api/jobs")[1]
        assert job["has_token"] and job["params"]["token"] == "set"
