"""The HTML pages: login, runs list, new project, data (preview and column mapping), parameters, job.

Server-rendered Jinja2 templates; forms post back here and either redirect to the next page or show the same page
with a message beside each wrong field. The job page's live parts (log, chart, chat) use the JSON API (api.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response, StreamingResponse

from tunelab.app.jobs import COMPLETED
from tunelab.app.params import build_params, default_values, field_specs, form_values
from tunelab.app.preview import preview
from tunelab.app.projects import FormErrors, create_project, save_mapping, start_job
from tunelab.app.results import evaluation, final_metrics, zip_stream
from tunelab.app.security import AUTH_COOKIE, CSRF_COOKIE, is_authenticated, same_token, session_value
from tunelab.app.uploads import CSRF_FIELD, FieldError, receive_form
from tunelab.app.worker import run_folder

router = APIRouter()


def state(request: Request) -> Any:
    return request.app.state.tunelab


def render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
    context.update(csrf=request.state.csrf, login=state(request).config.token is not None)
    return state(request).templates.TemplateResponse(request, name, context, status_code=status)


async def posted_form(request: Request) -> dict[str, str]:
    """An urlencoded form whose CSRF field matches the cookie (403 otherwise)."""
    form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
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


# ---- login and the runs list


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request) -> HTMLResponse:
    return render(request, "login.html", error=None)


@router.post("/login")
async def login(request: Request) -> Response:
    form = await posted_form(request)
    token = state(request).config.token
    if not token:
        return RedirectResponse("/", status_code=303)
    if not same_token(token, form.get("token")):
        return render(request, "login.html", 401, error="wrong token")
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(AUTH_COOKIE, session_value(token), httponly=True, samesite="strict")
    return response


@router.get("/", response_class=HTMLResponse)
def home(request: Request) -> HTMLResponse:
    store = state(request).store
    return render(request, "home.html", jobs=store.jobs(), projects=store.projects())


# ---- new project


@router.get("/projects/new", response_class=HTMLResponse)
def new_project_page(request: Request) -> HTMLResponse:
    return render(request, "new_project.html", errors={}, values={}, trainers=trainers())


@router.post("/projects")
async def new_project(request: Request) -> Response:
    config = state(request).config
    try:
        form = await receive_form(request, config.uploads_dir, config.max_upload_bytes, expected_csrf(request))
        check_csrf(request, form.fields.get(CSRF_FIELD))
        project_id = create_project(config, state(request).store, form)
    except FieldError as err:
        return _new_project_again(request, {err.field: err.message}, {}, err.status)
    except FormErrors as err:
        return _new_project_again(request, err.errors, form.fields, err.status)
    return RedirectResponse(f"/projects/{project_id}/data", status_code=303)


def _new_project_again(request: Request, errors: dict[str, str], values: dict[str, str], status: int) -> HTMLResponse:
    values = {k: v for k, v in values.items() if k != CSRF_FIELD}
    return render(request, "new_project.html", status, errors=errors, values=values, trainers=trainers())


def trainers() -> dict[str, str]:
    from tunelab.methods import SUMMARIES

    return SUMMARIES


# ---- data: preview and column mapping


@router.get("/projects/{project_id}/data", response_class=HTMLResponse)
def data_page(request: Request, project_id: int) -> HTMLResponse:
    project = project_or_404(request, project_id)
    return _data_page(request, project, {})


@router.post("/projects/{project_id}/data")
async def data_submit(request: Request, project_id: int) -> Response:
    project = project_or_404(request, project_id)
    form = await posted_form(request)
    try:
        project["settings"] = save_mapping(state(request).store, project, form)
    except FormErrors as err:
        return _data_page(request, project, err.errors, status=400)
    if form.get("action") == "next":
        return RedirectResponse(f"/projects/{project_id}/params", status_code=303)
    return _data_page(request, project, {})


def _data_page(request: Request, project: dict[str, Any], errors: dict[str, str], status: int = 200) -> HTMLResponse:
    settings = {**project["settings"], "project_name": str(state(request).config.jobs_dir / "preview" / "run")}
    params, param_errors = build_params(settings, default_values())
    shown = preview(settings, params)
    errors = {**param_errors, **shown.errors, **errors}
    return render(request, "data.html", status, project=project, preview=shown, plan=shown.summary(), errors=errors)


# ---- parameters and Start Training


@router.get("/projects/{project_id}/params", response_class=HTMLResponse)
def params_page(request: Request, project_id: int) -> HTMLResponse:
    project = project_or_404(request, project_id)
    return render(request, "params.html", project=project, fields=field_specs(), values=default_values(), errors={})


@router.post("/projects/{project_id}/params")
async def params_submit(request: Request, project_id: int) -> Response:
    project = project_or_404(request, project_id)
    form = await posted_form(request)
    values = form_values(form)
    shown_values = {**default_values(), **values}
    app = state(request)
    if form.get("action") == "start":
        try:
            job_id = start_job(
                app.config, app.store, app.worker, project, values, form.get("token") or None, "evaluate" in form
            )
        except FormErrors as err:
            return render(
                request, "params.html", 400, project=project, fields=field_specs(), values=shown_values,
                errors=err.errors,
            )  # fmt: skip
        return RedirectResponse(f"/jobs/{job_id}", status_code=303)
    settings = {**project["settings"], "project_name": str(app.config.jobs_dir / "preview" / "run")}
    params, errors = build_params(settings, values)
    shown = preview(settings, params) if params is not None else None
    if shown is not None:
        errors.update(shown.errors)
    return render(
        request, "params.html", 400 if errors else 200, project=project, fields=field_specs(), values=shown_values,
        errors=errors, plan=shown.summary() if shown else {},
    )  # fmt: skip


# ---- a job


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: int) -> HTMLResponse:
    job = job_or_404(request, job_id)
    done = job["status"] == COMPLETED
    from tunelab.app.exports import offered_dtypes

    return render(
        request, "job.html", job=job, metrics=final_metrics(job) if done else {},
        evaluation=evaluation(job) if done else None, export_dtypes=offered_dtypes(),
    )  # fmt: skip


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(request: Request, job_id: int) -> Response:
    job_or_404(request, job_id)
    await posted_form(request)
    state(request).worker.cancel(job_id)
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
def exported_file(request: Request, job_id: int, name: str) -> FileResponse:
    from tunelab.app.exports import export_file

    path = export_file(Path(job_or_404(request, job_id)["folder"]), name)
    if path is None:
        raise HTTPException(404, "no such exported file (export the job first)")
    return FileResponse(path, filename=name, media_type="application/octet-stream")


@router.get("/jobs/{job_id}/loss_curves.png")
def loss_curves(request: Request, job_id: int) -> FileResponse:
    path = run_folder(job_or_404(request, job_id)) / "evaluation" / "loss_curves.png"
    if not path.is_file():
        raise HTTPException(404, "no loss curves for this job")
    return FileResponse(Path(path), media_type="image/png")
