"""`tunelab app`: the web app's factory and its guard at the door (login, Host check, CSRF cookie).

    create_app(data_dir)           -> a FastAPI app (pages.py: the HTML pages; api.py: the JSON API)
    run_app(host, port, ...)       -> serve it with uvicorn until interrupted

Everything the app keeps lives under `data_dir`: app.db (projects and jobs), uploads/<uuid>/ (uploaded data),
jobs/<id>/ (config.yaml, train.log, run/). The jobs run one at a time in a background worker (worker.py).
"""

from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.app.chat import ChatModels
from tunelab.app.exports import Exports
from tunelab.app.jobs import JobStore
from tunelab.app.projects import AppConfig
from tunelab.app.render import FILTERS
from tunelab.app.security import (
    AUTH_COOKIE,
    CSRF_COOKIE,
    CsrfError,
    check_binding,
    check_token,
    host_allowed,
    is_authenticated,
    new_csrf_token,
)
from tunelab.app.uploads import FieldError
from tunelab.app.vault import Vault
from tunelab.app.worker import Worker, stop_leftovers
from tunelab.errors import TunelabError

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger("tunelab")
HERE = Path(__file__).parent
DEFAULT_DATA_DIR = "~/.tunelab/app"
OPEN_PATHS = ("/login", "/static/")  # reachable before logging in
UPLOAD_ROUTES = ("/projects", "/api/projects")  # POSTed with files: limits of their own, enforced as they stream
# Every other request body: a page's form or a JSON call, the largest a chat's history (chat.py: 2 x MAX_TURNS
# messages). Refused before a byte is read, so no route (login included) parses more than this.
MAX_BODY_BYTES = 2 * 2**20


@dataclass
class AppState:
    """What every route needs, kept on `app.state.tunelab`."""

    config: AppConfig
    store: JobStore
    worker: Worker
    chat: ChatModels
    exports: Exports
    templates: Any  # starlette Jinja2Templates


def create_app(
    data_dir: str | os.PathLike = DEFAULT_DATA_DIR,
    token: str | None = None,
    allowed_paths: list[str | os.PathLike] | None = None,
    max_upload_mb: float = 200,
    start_worker: bool = True,
) -> FastAPI:
    """The web app, its files under `data_dir`.

    Args:
        data_dir: The app's own folder (created if missing): database, uploads, jobs.
        token: When set, every request must carry it (login cookie or bearer header); without it, only requests
            addressed to a loopback name are served. An empty one is refused (ConfigError).
        allowed_paths: Folders besides `data_dir` that typed data and model paths may point into.
        max_upload_mb: The largest upload accepted, enforced while it streams in.
        start_worker: Run queued jobs (tests of the pages alone may leave it off).
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, RedirectResponse
    from fastapi.staticfiles import StaticFiles
    from fastapi.templating import Jinja2Templates

    from tunelab.app import api, pages

    check_token(token)
    root = Path(data_dir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    roots = [root, *(Path(p).expanduser().resolve() for p in allowed_paths or ())]
    config = AppConfig(root, roots, int(max_upload_mb * 2**20), token)
    store = JobStore(root / "app.db")
    stop_leftovers(store)  # what a killed app left running, before it is marked interrupted (and may be resumed)
    interrupted = store.mark_interrupted()
    if interrupted:
        log.info("app: %d job(s) were running when the app last stopped: marked interrupted", interrupted)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters.update(FILTERS)
    chat = ChatModels()
    state = AppState(config, store, Worker(store, Vault(root), before_job=chat.release), chat, Exports(), templates)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if start_worker:
            state.worker.start()
        yield
        state.worker.stop()

    app = FastAPI(title="tunelab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.tunelab = state
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.include_router(pages.router)
    app.include_router(api.router)

    @app.exception_handler(CsrfError)
    async def forged(request: Request, err: CsrfError) -> JSONResponse:
        return JSONResponse({"detail": "missing or wrong CSRF token: reload the page and send the form again"}, 403)

    @app.exception_handler(FieldError)
    async def bad_field(request: Request, err: FieldError) -> JSONResponse:
        return JSONResponse({"errors": {err.field: err.message}}, status_code=err.status)

    @app.exception_handler(TunelabError)
    async def tunelab_error(request: Request, err: TunelabError) -> JSONResponse:
        return JSONResponse({"errors": {"form": str(err)}}, status_code=400)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if token is None and not host_allowed(request.headers.get("host")):
            return JSONResponse({"detail": "this app answers to localhost / 127.0.0.1 only"}, status_code=400)
        path = request.url.path
        if not (request.method == "POST" and path in UPLOAD_ROUTES):
            length = request.headers.get("content-length")
            if length is None and "transfer-encoding" in request.headers:  # chunked: no size to check up front
                return JSONResponse({"detail": "send a Content-Length with the request body"}, 411)
            if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
                return JSONResponse({"detail": f"the request body is larger than {MAX_BODY_BYTES} bytes"}, 413)
        signed_in = is_authenticated(token, request.cookies.get(AUTH_COOKIE), request.headers.get("authorization"))
        if not signed_in and not path.startswith(OPEN_PATHS):
            if path.startswith("/api/") or request.method != "GET":
                return JSONResponse({"detail": "log in first (or send Authorization: Bearer <token>)"}, 401)
            return RedirectResponse("/login", status_code=303)
        csrf = request.cookies.get(CSRF_COOKIE)
        request.state.csrf = csrf or new_csrf_token()
        response = await call_next(request)
        if not csrf:
            response.set_cookie(CSRF_COOKIE, request.state.csrf, httponly=True, samesite="strict")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    return app


def run_app(
    host: str = "127.0.0.1",
    port: int = 7860,
    data_dir: str = DEFAULT_DATA_DIR,
    token: str | None = None,
    allowed_paths: list[str] | None = None,
    max_upload_mb: float = 200,
) -> None:
    """Serve the app with uvicorn until interrupted; refuses an empty token, and a non-loopback host without one."""
    import uvicorn

    from tunelab.inference.serve import check_port_free

    check_token(token)  # before check_binding, whose message would ask for the --token that was given empty
    check_binding(host, token)
    check_port_free(host, port)
    app = create_app(data_dir, token, allowed_paths, max_upload_mb)
    shown = f"[{host}]" if ":" in host else host
    log.info("app: http://%s:%d (data in %s)", shown, port, app.state.tunelab.config.data_dir)
    uvicorn.run(app, host=host, port=port, log_level="warning")
