"""The HTML pages: login, runs list, new project, data (preview and column mapping), parameters, job, compare.

Server-rendered Jinja2 templates; forms post back here and either redirect to the next page or show the same page
with a message beside each wrong field. The live parts (log, charts, chat, base beside tuned, predict, export,
the machine panel on every page) use the JSON API (api.py). The dry run behind the data and parameters pages runs
in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response, StreamingResponse

from tunelab.app.jobs import COMPLETED, RUNNING
from tunelab.app.params import (
    CLASSIFIER,
    build_params,
    carried_params,
    default_values,
    field_specs,
    form_values,
    is_classifier,
    read_carried,
)
from tunelab.app.preview import preview
from tunelab.app.projects import FormErrors, create_project, save_mapping, start_job
from tunelab.app.results import evaluation, final_metrics, zip_stream
from tunelab.app.security import AUTH_COOKIE, CSRF_COOKIE, is_authenticated, same_token, session_value
from tunelab.app.uploads import CSRF_FIELD, MAX_FIELD_BYTES, FieldError, receive_form
from tunelab.app.worker import EVALUATED_TRAINERS, run_folder

router = APIRouter()


def state(request: Request) -> Any:
    return request.app.state.tunelab


def render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
    context.update(csrf=request.state.csrf, login=state(request).config.token is not None)
    return state(request).templates.TemplateResponse(request, name, context, status_code=status)


# A page's form (login, data, parameters, cancel, retry) holds no file and a few dozen short fields (the
# parameters page the most). It is parsed before its CSRF field can be checked, at /login before any login, so
# Starlette's defaults (1000 fields of 1 MB each, any number of files spooled to disk) are not kept; the guard
# (server.py) refuses bodies over MAX_BODY_BYTES before any of it is read.
FORM_LIMITS = {"max_files": 0, "max_fields": 200, "max_part_size": MAX_FIELD_BYTES}


async def posted_form(request: Request) -> dict[str, str]:
    """An urlencoded (or multipart, without files) form whose CSRF field matches the cookie (403 otherwise)."""
    form = {k: v for k, v in (await request.form(**FORM_LIMITS)).items() if isinstance(v, str)}
    check_csrf(request, form.get(CSRF_FIELD))
    return form


def expected_csrf(request: Request) -> str | None:
    """The CSRF token a POST must carry (the cookie's; "" when there is none), or None for a bearer-token call."""
    token = state(request).config.token
    if token and is_authenticated(token, None, request.headers.get("authorization")):
        return None  # a browser never sends a bearer header on its own: no cross-site forgery possible
    return request.cookies.get(CSRF_COOKIE) or ""


def check_csrf(request: Request, given: str | None) -> None:
    """Double submit: the form field (or X-CSRF-Token header) must equal the cookie. Bearer calls need none."""
    expected = expected_csrf(request)
    if expected is not None and not same_token(expected, given):
        raise HTTPException(403, "missing or wrong CSRF token: reload the page and send the form again")


def project_or_404(request: Request, project_id: int) -> dict[str, Any]:
    project = state(request).store.project(project_id)
    if project is None:
        raise HTTPException(404, f"no project {project_id}")
    return project


def job_or_404(request: Request, job_id: int) -> dict[str, Any]:
    job = state(request).store.job(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    return job


def running_job_folder(store: Any) -> Path | None:
    """The folder of the job running now (its metrics carry the peak memory the machine panel shows)."""
    running = [job for job in store.jobs() if job["status"] == RUNNING]
    return Path(running[0]["folder"]) if running else None


def preview_settings(request: Request, project: dict[str, Any]) -> dict[str, Any]:
    """A project's settings with the throwaway run folder every dry run of the app plans into."""
    return {**project["settings"], "project_name": str(state(request).config.jobs_dir / "preview" / "run")}


# ---- login and the runs list


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request) -> HTMLResponse:
    return render(request, "login.html", error=None, hide_machine=True)


@router.post("/login")
async def login(request: Request) -> Response:
    form = await posted_form(request)
    token = state(request).config.token
    if not token:
        return RedirectResponse("/", status_code=303)
    if not same_token(token, form.get("token")):
        return render(request, "login.html", 401, error="wrong token", hide_machine=True)
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(AUTH_COOKIE, session_value(token), httponly=True, samesite="strict")
    return response


@router.get("/", response_class=HTMLResponse)
def home(request: Request) -> HTMLResponse:
    store = state(request).store
    return render(request, "home.html", jobs=store.jobs(), projects=store.projects())


# ---- new project


@router.get("/projects/new", response_class=HTMLResponse)
def new_project_page(request: Request, model: str = "", trainer: str = "", name: str = "") -> HTMLResponse:
    """The form; `?model=<a run's model folder>` starts a project from a finished run (its model as the base)."""
    values = {k: v for k, v in (("model", model), ("trainer", trainer), ("name", name)) if v}
    return render(request, "new_project.html", errors={}, values=values, trainers=trainers())


@router.post("/projects")
async def new_project(request: Request) -> Response:
    config = state(request).config
    try:
        form = await receive_form(request, config.uploads_dir, config.max_upload_bytes, expected_csrf(request))
        # Reads the data files (up to --max-upload-mb): off the event loop, which serves every other request
        project_id = await asyncio.to_thread(create_project, config, state(request).store, form)
    except FieldError as err:
        return _new_project_again(request, {err.field: err.message}, {}, err.status)
    except FormErrors as err:
        return _new_project_again(request, err.errors, form.fields, err.status)
    return RedirectResponse(f"/projects/{project_id}/data", status_code=303)


def _new_project_again(request: Request, errors: dict[str, str], values: dict[str, str], status: int) -> HTMLResponse:
    values = {k: v for k, v in values.items() if k != CSRF_FIELD}
    return render(request, "new_project.html", status, errors=errors, values=values, trainers=trainers())


def trainers() -> dict[str, str]:
    """The Task choices: every LLM method of the registry, then text classification."""
    from tunelab.methods import SUMMARIES

    shown = {name: f"LLM {name}: {summary}" for name, summary in SUMMARIES.items()}
    shown[CLASSIFIER] = "Text classification: a label per text (a sequence classifier on the base model)"
    return shown


# ---- data: preview and column mapping


@router.get("/projects/{project_id}/data", response_class=HTMLResponse)
async def data_page(request: Request, project_id: int) -> HTMLResponse:
    project = project_or_404(request, project_id)
    return await _data_page(request, project, {})


@router.post("/projects/{project_id}/data")
async def data_submit(request: Request, project_id: int) -> Response:
    project = project_or_404(request, project_id)
    form = await posted_form(request)
    try:
        project["settings"] = save_mapping(state(request).store, project, form)
    except FormErrors as err:
        return await _data_page(request, project, err.errors, status=400)
    if form.get("action") == "next":
        return RedirectResponse(f"/projects/{project_id}/params", status_code=303)
    return await _data_page(request, project, {})


async def _data_page(
    request: Request, project: dict[str, Any], errors: dict[str, str], status: int = 200
) -> HTMLResponse:
    settings = preview_settings(request, project)
    params, param_errors = build_params(settings, default_values(settings["trainer"]), state(request).config.roots)
    shown = await asyncio.to_thread(preview, settings, params)
    errors = {**param_errors, **shown.errors, **errors}
    return render(request, "data.html", status, project=project, preview=shown, plan=shown.summary(), errors=errors)


# ---- parameters and Start Training


@router.get("/projects/{project_id}/params", response_class=HTMLResponse)
def params_page(request: Request, project_id: int, from_job: int | None = None) -> HTMLResponse:
    """The form at its defaults, or (`?from_job=N`, "run again") filled with that job's parameters."""
    project = project_or_404(request, project_id)
    trainer = project["settings"]["trainer"]
    values = default_values(trainer)
    note, carried = None, {}
    if from_job is not None:
        job = job_or_404(request, from_job)
        values.update({k: v for k, v in job["params"].items() if k in values and k != "token"})
        carried = carried_params(job["params"], trainer)  # set through the API or a config: kept, and listed
        note = f"The parameters of {job['name']}: change what you want to try, then Start Training."
    return _params_page(request, project, values, {}, note=note, carried=carried)


def _params_page(
    request: Request,
    project: dict[str, Any],
    values: dict[str, Any],
    errors: dict[str, str],
    status: int = 200,
    plan: dict[str, Any] | None = None,
    note: str | None = None,
    unfit: bool = False,
    evaluate: bool = True,
    token_given: bool = False,
    carried: dict[str, Any] | None = None,
) -> HTMLResponse:
    fields = field_specs(project["settings"]["trainer"])
    # An object parameter (chat_template_kwargs) a job was given as JSON through the API: shown as JSON text; a list
    # (add_tokens) as the comma-separated text the field takes
    values = {name: _as_field_text(v) for name, v in values.items()}
    carried = carried or {}
    shown_carried = {name: _as_field_text(v) for name, v in carried.items()}
    return render(
        request, "params.html", status, project=project, fields=fields, values=values, errors=errors,
        plan=plan or {}, note=note, unfit=unfit, evaluate=evaluate, token_given=token_given,
        carried_json=json.dumps(carried), carried=shown_carried,
        evaluated=project["settings"]["trainer"] in EVALUATED_TRAINERS,
    )  # fmt: skip


def _as_field_text(value: Any) -> Any:
    if isinstance(value, dict):
        return json.dumps(value)
    return ",".join(str(item) for item in value) if isinstance(value, list) else value


@router.post("/projects/{project_id}/params")
async def params_submit(request: Request, project_id: int) -> Response:
    """Check (the dry run), or Start Training: the plan is made first, and a plan that does not fit the device
    is shown with a warning and a "Start anyway" button instead of being queued."""
    project = project_or_404(request, project_id)
    trainer = project["settings"]["trainer"]
    form = await posted_form(request)
    try:
        carried = read_carried(form.get("carried"), trainer)  # "run again": a job's parameters beyond the form
    except FieldError as err:
        return _params_page(request, project, default_values(trainer), {err.field: err.message}, 400)
    values = {**carried, **form_values(form, trainer)}
    shown_values = {**default_values(trainer), **values}
    app = state(request)
    action = form.get("action")
    settings = preview_settings(request, project)
    token = form.get("token") or None  # checked with the rest (push_to_hub needs one), never shown again
    params, errors = build_params(settings, {**values, **({"token": token} if token else {})}, app.config.roots)
    shown = None
    if params is not None and action != "start_anyway":
        shown = await asyncio.to_thread(preview, settings, params)
        errors.update(shown.errors)
    plan = shown.summary() if shown else {}
    if (
        action in ("start", "start_anyway")
        and not errors
        and (plan.get("fits") is not False or action == "start_anyway")
    ):
        try:
            job_id = start_job(app.config, app.store, app.worker, project, values, token, "evaluate" in form)
        except FormErrors as err:
            return _params_page(
                request, project, shown_values, err.errors, 400, evaluate="evaluate" in form, carried=carried
            )
        return RedirectResponse(f"/jobs/{job_id}", status_code=303)
    unfit = action == "start" and plan.get("fits") is False
    return _params_page(
        request, project, shown_values, errors, 400 if errors else 200, plan, unfit=unfit,
        evaluate="evaluate" in form, token_given=token is not None, carried=carried,
    )  # fmt: skip


# ---- a job


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: int) -> HTMLResponse:
    from tunelab.app.classification import classification_results
    from tunelab.app.exports import merged_folder, offered_dtypes
    from tunelab.app.results import shown_metrics

    job = job_or_404(request, job_id)
    done = job["status"] == COMPLETED
    classifier = is_classifier(job["params"])
    run = run_folder(job)
    # The model a new project would start from: the run itself when it holds full weights, else its merged export
    if classifier:  # a LoRA classifier's run holds its full model in merged/ already
        full = run / "merged" if (run / "merged" / "config.json").is_file() else run
    else:
        full = run if (run / "config.json").is_file() else merged_folder(Path(job["folder"]))
    return render(
        request, "job.html", job=job, metrics=shown_metrics(final_metrics(job)) if done else [],
        evaluation=evaluation_shown(job) if done else None, export_dtypes=offered_dtypes(), classifier=classifier,
        classification=classification_results(job) if done else None, base_model=full if done else None,
        project=state(request).store.project(job["project_id"]), samples=_samples_completions(job["params"]),
    )  # fmt: skip


def _samples_completions(params: dict[str, Any]) -> bool:
    """Whether a job's run writes sample completions (grpo, rloo: the methods that sample from prompts)."""
    from tunelab.methods import REGISTRY

    entry = REGISTRY.get(params.get("trainer") or "")
    return entry is not None and entry.data == "prompts"


def evaluation_shown(job: dict[str, Any]) -> dict[str, Any] | None:
    """The evaluation report's numbers (a preference run's figures under their training names), and its samples as
    their own cards (prompt, reference, tuned, base; a pair's chosen and rejected answers: text kept as written,
    code and line breaks included) rather than as Markdown paragraphs. `pairs`: a preference run's evaluation."""
    found = evaluation(job)
    if found is None:
        return None
    samples = []
    for sample in found["results"].get("samples") or []:
        prompt = sample.get("prompt")
        if isinstance(prompt, list):  # a conversation: the last user turn is what was asked
            prompt = next((m.get("content", "") for m in reversed(prompt) if m.get("role") == "user"), "")
        samples.append({**sample, "prompt": str(prompt or ""), "rejected": sample.get("rejected")})
    from tunelab.app.results import shown_log

    report = shown_log(found["report"].split("\n## Sample ")[0], Path(job["folder"]))
    data = Path(str(job["params"].get("data_path") or ""))
    report = report.replace(str(data), data.name) if data.name else report  # an upload's long folder, left out
    return {**found, "report": report, "samples": samples, "pairs": "method" in found["results"]}


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(request: Request, job_id: int) -> Response:
    job_or_404(request, job_id)
    await posted_form(request)
    await asyncio.to_thread(state(request).worker.cancel, job_id)  # waits for the job to stop (up to 10 s)
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)


@router.post("/jobs/{job_id}/retry")
async def retry_job(request: Request, job_id: int) -> Response:
    job_or_404(request, job_id)
    await posted_form(request)
    if state(request).store.requeue(job_id):
        state(request).worker.submit(job_id)
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)


@router.get("/jobs/{job_id}/download")
def download(request: Request, job_id: int) -> StreamingResponse:
    job = job_or_404(request, job_id)
    folder = run_folder(job)
    if job["status"] != COMPLETED or not folder.is_dir():
        raise HTTPException(404, "this job has no finished run to download")
    name = f"tunelab-job-{job_id}.zip"
    headers = {"Content-Disposition": f'attachment; filename="{name}"'}
    return StreamingResponse(zip_stream(folder), media_type="application/zip", headers=headers)


@router.get("/jobs/{job_id}/export/{name}")
def exported_file(request: Request, job_id: int, name: str) -> Response:
    from tunelab.app.exports import export_file, merged_folder

    job_folder = Path(job_or_404(request, job_id)["folder"])
    if name == "merged.zip":
        folder = merged_folder(job_folder)
        if folder is None:
            raise HTTPException(404, "no merged model yet (export it first)")
        headers = {"Content-Disposition": f'attachment; filename="tunelab-job-{job_id}-merged.zip"'}
        return StreamingResponse(zip_stream(folder), media_type="application/zip", headers=headers)
    path = export_file(job_folder, name)
    if path is None:
        raise HTTPException(404, "no such exported file (export the job first)")
    return FileResponse(path, filename=name, media_type="application/octet-stream")


# ---- runs compared


@router.get("/compare", response_class=HTMLResponse)
def compare_page(request: Request) -> HTMLResponse:
    """?jobs=1&jobs=2 (the runs list's checkboxes) or ?jobs=1,2: the runs side by side."""
    from tunelab.app.compare import comparison, parse_job_ids
    from tunelab.app.uploads import FieldError

    try:
        ids = parse_job_ids(request.query_params.getlist("jobs"))
    except FieldError as err:
        store = state(request).store
        return render(request, "home.html", 400, jobs=store.jobs(), projects=store.projects(), error=err.message)
    compared = comparison([job_or_404(request, job_id) for job_id in ids], state(request).store)
    return render(request, "compare.html", compared=compared, ids=",".join(map(str, ids)))


@router.get("/jobs/{job_id}/loss_curves.png")
def loss_curves(request: Request, job_id: int) -> FileResponse:
    path = run_folder(job_or_404(request, job_id)) / "evaluation" / "loss_curves.png"
    if not path.is_file():
        raise HTTPException(404, "no loss curves for this job")
    return FileResponse(Path(path), media_type="image/png")
