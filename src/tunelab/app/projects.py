"""What the app's forms do, shared by the HTML pages (pages.py) and the JSON API (api.py): create a project from
the new-project form, save its column mapping, and start a training job from its parameters.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tunelab.app.jobs import JobStore
from tunelab.app.params import build_params
from tunelab.app.uploads import FieldError, Form, check_data_file, check_extension, resolve_user_path
from tunelab.app.worker import CONFIG_FILE, RUN_DIR, Worker

MAPPING_FIELDS = ("text_column", "prompt_text_column", "rejected_text_column", "chat_template")


@dataclass
class AppConfig:
    """Where the app keeps its files and what it lets users reach."""

    data_dir: Path
    roots: list[Path]  # folders a typed path may point into; the data folder first
    max_upload_bytes: int
    token: str | None = None

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"


class FormErrors(Exception):
    """Several fields wrong at once: {field: message}."""

    def __init__(self, errors: dict[str, str], status: int = 400) -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors, self.status = errors, status


def create_project(config: AppConfig, store: JobStore, form: Form) -> int:
    """A project from the new-project form: name, trainer, base model, data (upload or path), validation data."""
    from tunelab.methods import REGISTRY

    fields, errors, settings = form.fields, {}, {}
    status = 400  # 403 when a path leaves the allowed folders
    settings["name"] = re.sub(r"\s+", " ", fields.get("name", "")).strip()[:80] or "my-project"
    settings["trainer"] = fields.get("trainer") or "sft"
    if settings["trainer"] not in REGISTRY:
        errors["trainer"] = f"{settings['trainer']!r} is not one of {', '.join(REGISTRY)}"
    try:
        settings["model"] = model_reference(fields.get("model", "").strip(), config.roots)
    except FieldError as err:
        errors[err.field], status = err.message, max(status, err.status)
    for kind, required in (("data", True), ("valid", False)):
        try:
            path, columns = data_reference(config, form, kind, required)
        except FieldError as err:
            errors[err.field], status = err.message, max(status, err.status)
            continue
        if path is not None:
            settings["data_path" if kind == "data" else "valid_split"] = str(path)
            settings[f"{kind}_columns"] = columns
    if errors:
        raise FormErrors(errors, status)
    return store.add_project(settings["name"], settings)


def data_reference(config: AppConfig, form: Form, kind: str, required: bool) -> tuple[Path | None, list[str]]:
    """(path, columns) of the uploaded file (`<kind>_file`) or the typed path (`<kind>_path`), read as training
    will read it (a folder of split files is read when planned)."""
    upload, typed = form.files.get(f"{kind}_file"), form.fields.get(f"{kind}_path", "").strip()
    if upload is not None:
        return upload, check_data_file(f"{kind}_file", upload)
    if typed:
        path = resolve_user_path(f"{kind}_path", typed, config.roots)
        if path.is_file():
            check_extension(f"{kind}_path", path.name)
            return path, check_data_file(f"{kind}_path", path)
        return path, []
    if required:
        raise FieldError(f"{kind}_file", "upload a CSV, JSONL, JSON or Parquet file, or give a path")
    return None, []


def model_reference(text: str, roots: list[Path]) -> str:
    """A hub id as typed, or a local model folder / .gguf file checked to lie inside the allowed roots."""
    from tunelab.config.base import DEFAULT_MODEL

    if not text:
        return DEFAULT_MODEL
    looks_local = text.startswith((".", "/", "~")) or text.lower().endswith(".gguf") or text.count("/") > 1
    if looks_local:
        return str(resolve_user_path("model", text, roots))
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", text):
        raise FieldError("model", f"{text!r} is neither a hub id (owner/name) nor a path")
    return text


def save_mapping(store: JobStore, project: dict[str, Any], form: dict[str, str]) -> dict[str, Any]:
    """The column mapping and chat template chosen on the data page, kept in the project's settings."""
    settings = dict(project["settings"])
    columns = settings.get("data_columns") or []
    for name in MAPPING_FIELDS:
        value = (form.get(name) or "").strip()
        if name != "chat_template" and value and columns and value not in columns:
            raise FormErrors({name: f"{value!r} is not a column of the data (columns: {', '.join(columns)})"})
        settings[name] = value or None
    store.update_project(project["id"], settings)
    return settings


def start_job(
    config: AppConfig,
    store: JobStore,
    worker: Worker,
    project: dict[str, Any],
    values: dict[str, Any],
    token: str | None = None,
    evaluate: bool = True,
) -> int:
    """Check the parameters, write the job's folder and config, queue it; FormErrors names bad fields."""
    folder = config.jobs_dir / uuid.uuid4().hex[:12]
    settings = {**project["settings"], "project_name": str(folder / RUN_DIR)}
    params, errors = build_params(settings, values)
    if params is None:
        raise FormErrors(errors)
    folder.mkdir(parents=True)
    # The token never goes into the file: the worker hands it to the run as HF_TOKEN.
    written = {k: v for k, v in params.to_dict(redact=False).items() if k != "token"}
    (folder / CONFIG_FILE).write_text(yaml.safe_dump(written, sort_keys=False), encoding="utf-8")
    shown = params.to_dict(redact=True)
    shown["token"] = "set" if token else None
    number = sum(1 for job in store.jobs() if job["project_id"] == project["id"]) + 1
    job_id = store.add_job(project["id"], f"{project['name']} #{number}", shown, folder, evaluate)
    worker.submit(job_id, token)
    return job_id
