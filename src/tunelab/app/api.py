"""The JSON API: what the pages poll (status, log, metrics, the machine) and post (chat, base beside tuned,
predict, export, push, cancel), and the same project and job actions as the forms, for scripts and tests. Errors
come back as `{"errors": {field: message}}`.

A finished job exports (`/api/jobs/{id}/export`, kind gguf, adapter or merged: POST starts it, GET is its state) and
pushes to the hub (`/api/jobs/{id}/push`); `/api/compare?jobs=1,2` puts several runs side by side.

POST calls from a browser carry the CSRF token in the X-CSRF-Token header; calls with `Authorization: Bearer`
need none.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from tunelab.app.charts import charts, series
from tunelab.app.chat import MAX_MESSAGE_CHARS, parse_chat
from tunelab.app.classification import classification_results
from tunelab.app.compare import comparison, parse_job_ids
from tunelab.app.exports import KINDS, offered_dtypes
from tunelab.app.jobs import COMPLETED
from tunelab.app.machine import machine_status
from tunelab.app.pages import check_csrf, expected_csrf, job_or_404, project_or_404, running_job_folder, state
from tunelab.app.params import is_classifier
from tunelab.app.preview import preview
from tunelab.app.projects import FormErrors, create_project, save_mapping, start_job
from tunelab.app.results import evaluation, final_metrics, log_tail, loss_points, metric_records, sample_completions
from tunelab.app.security import CSRF_HEADER
from tunelab.app.uploads import FieldError, receive_form
from tunelab.app.worker import run_folder
from tunelab.errors import TunelabError

router = APIRouter(prefix="/api")


def errors(found: dict[str, str], status: int = 400) -> JSONResponse:
    return JSONResponse({"errors": found}, status_code=status)


async def json_body(request: Request) -> dict[str, Any]:
    check_csrf(request, request.headers.get(CSRF_HEADER))
    try:
        body = await request.json()
    except ValueError:
        raise FieldError("body", "expected a JSON object") from None
    if not isinstance(body, dict):
        raise FieldError("body", "expected a JSON object")
    return body


@router.post("/projects")
async def new_project(request: Request) -> JSONResponse:
    """Multipart form as on the new-project page (name, trainer, model, data_file | data_path, valid_...)."""
    config = state(request).config
    try:
        form = await receive_form(request, config.uploads_dir, config.max_upload_bytes, expected_csrf(request))
        # Reads the data files (up to --max-upload-mb): off the event loop, which serves every other request
        project_id = await asyncio.to_thread(create_project, config, state(request).store, form)
    except FieldError as err:
        return errors({err.field: err.message}, err.status)
    except FormErrors as err:
        return errors(err.errors, err.status)
    return JSONResponse(state(request).store.project(project_id), status_code=201)


@router.post("/projects/{project_id}/preview")
async def project_preview(request: Request, project_id: int) -> JSONResponse:
    """Save a column mapping (if given) and return the plan of the run with default (or given) parameters."""
    from tunelab.app.params import build_params, default_values

    project = project_or_404(request, project_id)
    body = await json_body(request)
    for name in ("mapping", "params"):
        if not isinstance(body.get(name) or {}, dict):
            return errors({name: "expected a JSON object"})
    try:
        settings = save_mapping(state(request).store, project, body.get("mapping") or {})
    except FormErrors as err:
        return errors(err.errors)
    settings["project_name"] = str(state(request).config.jobs_dir / "preview" / "run")
    values = {**default_values(settings["trainer"]), **(body.get("params") or {})}
    params, found = build_params(settings, values, state(request).config.roots)
    if params is None:
        return errors(found)
    shown = await asyncio.to_thread(preview, settings, params)  # reads and tokenizes the data: off the event loop
    if shown.errors:
        return errors(shown.errors)
    return JSONResponse({"columns": shown.columns, "rows": shown.rows, "plan": shown.summary()})


@router.post("/projects/{project_id}/jobs")
async def new_job(request: Request, project_id: int) -> JSONResponse:
    """Start training: {"params": {...}, "token": "...", "evaluate": true}; the params not given keep the form's
    defaults."""
    from tunelab.app.params import default_values

    project = project_or_404(request, project_id)
    body = await json_body(request)
    app = state(request)
    if not isinstance(body.get("params") or {}, dict):
        return errors({"params": "expected a JSON object"})
    if body.get("token") is not None and not isinstance(body["token"], str):
        return errors({"token": "expected a string"})
    values = {**default_values(project["settings"]["trainer"]), **(body.get("params") or {})}
    try:
        job_id = start_job(
            app.config, app.store, app.worker, project, values, body.get("token"), bool(body.get("evaluate", True))
        )
    except FormErrors as err:
        return errors(err.errors)
    return JSONResponse(app.store.job(job_id), status_code=201)


@router.get("/jobs")
def list_jobs(request: Request) -> list[dict[str, Any]]:
    return state(request).store.jobs()


@router.get("/jobs/{job_id}")
def get_job(request: Request, job_id: int) -> dict[str, Any]:
    job = job_or_404(request, job_id)
    if job["status"] == COMPLETED:
        job["metrics"] = final_metrics(job)
        job["evaluation"] = evaluation(job)
        job["classification"] = classification_results(job)
    return job


@router.get("/jobs/{job_id}/log")
def job_log(request: Request, job_id: int, offset: int = 0) -> dict[str, Any]:
    job = job_or_404(request, job_id)
    text, next_offset = log_tail(job, offset)
    return {"text": text, "offset": next_offset, "status": job["status"]}


@router.get("/jobs/{job_id}/metrics")
def job_metrics(request: Request, job_id: int) -> dict[str, Any]:
    job = job_or_404(request, job_id)
    records = metric_records(job)
    return {
        "status": job["status"],
        "points": loss_points(records),
        "charts": charts(series(records)),
        "last": records[-1] if records else None,
    }


@router.get("/jobs/{job_id}/completions")
def job_completions(request: Request, job_id: int) -> dict[str, Any]:
    """A grpo or rloo job's sample completions with their rewards, newest first (empty for other methods)."""
    return {"samples": sample_completions(job_or_404(request, job_id))}


@router.post("/jobs/{job_id}/cancel")
async def cancel(request: Request, job_id: int) -> dict[str, Any]:
    job_or_404(request, job_id)
    check_csrf(request, request.headers.get(CSRF_HEADER))
    # Stopping a running job waits for its process (SIGKILL after 10 s): in a thread, not on the event loop
    return {"cancelled": await asyncio.to_thread(state(request).worker.cancel, job_id)}


def finished(job: dict[str, Any], field: str, what: str) -> None:
    if job["status"] != COMPLETED:
        raise FieldError(field, f"the job has not finished: there is no model to {what} yet", status=409)


@router.post("/jobs/{job_id}/chat")
async def chat(request: Request, job_id: int) -> JSONResponse:
    job = job_or_404(request, job_id)
    body = await json_body(request)
    history, message, options = parse_chat(body)
    finished(job, "message", "talk to")
    if is_classifier(job["params"]):
        return errors({"message": "a text classifier labels texts: use the predict box"}, 409)
    # Loading and generating are blocking (torch): keep them off the event loop.
    answer = await asyncio.to_thread(state(request).chat.answer, run_folder(job), history, message, options)
    return JSONResponse({"answer": answer})


@router.post("/jobs/{job_id}/side-by-side")
async def side_by_side(request: Request, job_id: int) -> JSONResponse:
    """{"message", "sample", "temperature", "seed"}: the base model's answer and the run's, same decoding."""
    job = job_or_404(request, job_id)
    body = await json_body(request)
    _, message, options = parse_chat({**body, "history": []})
    finished(job, "message", "talk to")
    if is_classifier(job["params"]):
        return errors({"message": "a text classifier has no answers to compare: use the predict box"}, 409)
    seed = body.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        return errors({"seed": "expected an integer"})
    answers = await asyncio.to_thread(state(request).chat.side_by_side, run_folder(job), message, options, seed)
    return JSONResponse(answers)


@router.post("/jobs/{job_id}/predict")
async def predict(request: Request, job_id: int) -> JSONResponse:
    """{"text"}: every label's probability, most likely first."""
    job = job_or_404(request, job_id)
    body = await json_body(request)
    text = body.get("text")
    if not isinstance(text, str) or not text.strip():
        return errors({"text": "type a text to label"})
    if len(text) > MAX_MESSAGE_CHARS:
        return errors({"text": f"the text is longer than {MAX_MESSAGE_CHARS} characters"})
    finished(job, "text", "label texts with")
    if not is_classifier(job["params"]):
        return errors({"text": "only a text-classification run labels texts"}, 409)
    found = await asyncio.to_thread(state(request).chat.classify, run_folder(job), text.strip())
    ranked = sorted(found.items(), key=lambda item: -item[1])
    return JSONResponse({"label": ranked[0][0], "probabilities": [{"label": k, "p": v} for k, v in ranked]})


@router.get("/jobs/{job_id}/export")
def export_state(request: Request, job_id: int, kind: str = "gguf") -> dict[str, Any]:
    job = job_or_404(request, job_id)
    if kind not in KINDS:
        raise FieldError("kind", f"expected one of {', '.join(KINDS)}")
    return {**state(request).exports.status(job_id, Path(job["folder"]), kind), "dtypes": offered_dtypes()}


@router.post("/jobs/{job_id}/export")
async def export(request: Request, job_id: int) -> JSONResponse:
    """{"kind": "gguf", "dtype": "q4_k_m"}: the GGUF file and its Modelfile; {"kind": "adapter"}: the LoRA adapter
    alone as llama.cpp's adapter GGUF; {"kind": "merged"}: the LoRA merged into its base as safetensors. Each lands
    in the job's export/ folder; poll GET for the files."""
    job = job_or_404(request, job_id)
    body = await json_body(request)
    finished(job, "dtype", "export")
    kind = body.get("kind", "gguf")
    if is_classifier(job["params"]) and kind in ("gguf", "adapter", "merged"):
        # a LoRA classifier's run holds its merged model already (run/merged), in the download
        return errors({"kind": "export is for language models; download the classifier's run instead"}, 409)
    options = {"dtype": body.get("dtype", "f16")} if kind == "gguf" else {}
    try:
        started = state(request).exports.start(job_id, run_folder(job), Path(job["folder"]), kind, **options)
    except TunelabError as err:
        return errors({"dtype" if kind == "gguf" else "kind": str(err)})
    return JSONResponse(started, status_code=202)


@router.post("/jobs/{job_id}/push")
async def push(request: Request, job_id: int) -> JSONResponse:
    """{"repo_id": "owner/name", "token": "hf_..."}: upload the run folder (private); the token is used once."""
    job = job_or_404(request, job_id)
    body = await json_body(request)
    finished(job, "repo_id", "push")
    token = body.get("token")
    if token is not None and not isinstance(token, str):
        return errors({"token": "expected a string"})
    repo_id = body.get("repo_id")
    if not isinstance(repo_id, str):
        return errors({"repo_id": "give the hub repository as owner/name"})
    try:
        started = state(request).exports.start(
            job_id, run_folder(job), Path(job["folder"]), "push", repo_id=repo_id, token=token
        )
    except TunelabError as err:
        return errors({"repo_id": str(err)})
    return JSONResponse(started, status_code=202)


@router.get("/compare")
def compare(request: Request, jobs: str = "") -> dict[str, Any]:
    """?jobs=1,2,3: the runs' charts, final metrics side by side and the parameters that differ."""
    store = state(request).store
    return comparison([job_or_404(request, job_id) for job_id in parse_job_ids(jobs)], store)


@router.get("/machine")
def machine(request: Request) -> dict[str, Any]:
    """Device, accelerator memory, RAM, disk free where runs are written, the running job's peak memory."""
    app = state(request)
    return machine_status(app.config.data_dir, running_job_folder(app.store))
