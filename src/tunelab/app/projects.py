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
from tunelab.app.params import CLASSIFIER, build_params, is_classifier
from tunelab.app.uploads import (
    FieldError,
    Form,
    check_data_file,
    check_extension,
    checked_model,
    discard_uploads,
    resolve_user_path,
)
from tunelab.app.worker import CONFIG_FILE, RUN_DIR, Worker
from tunelab.config.llm import CHAT_TEMPLATES

MAPPING_FIELDS = ("text_column", "prompt_text_column", "rejected_text_column", "chat_template", "target_column")


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
    """A project from the new-project form: name, trainer, base model, data (upload or path), validation data.

    Reads the data files (up to --max-upload-mb): call it off the event loop. The uploads of a form refused for
    any reason are deleted, so failed attempts leave nothing in uploads/.
    """
    try:
        settings = project_settings(config, form)
    except BaseException:
        discard_uploads(form)
        raise
    return store.add_project(settings["name"], settings)


def project_settings(config: AppConfig, form: Form) -> dict[str, Any]:
    """The settings of the project a new-project form describes (FormErrors names every wrong field)."""
    from tunelab.methods import REGISTRY

    fields, errors, settings = form.fields, {}, {}
    status = 400  # 403 when a path leaves the allowed folders
    settings["name"] = re.sub(r"\s+", " ", fields.get("name", "")).strip()[:80] or "my-project"
    settings["trainer"] = fields.get("trainer") or "sft"
    if settings["trainer"] not in (*REGISTRY, CLASSIFIER):
        errors["trainer"] = f"{settings['trainer']!r} is not one of {', '.join((*REGISTRY, CLASSIFIER))}"
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
    if is_classifier(settings):
        settings.update(classifier_columns(settings.get("data_columns") or []))
    return settings


LABEL_COLUMNS = ("target", "label", "labels", "class", "category", "sentiment")


def classifier_columns(columns: list[str]) -> dict[str, str | None]:
    """The text and label columns a classifier's data most likely has (the data page can change them)."""
    label = next((c for c in LABEL_COLUMNS if c in columns), None)
    text = "text" if "text" in columns else next((c for c in columns if c != label), None)
    return {"text_column": text, "target_column": label}


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
        shown = "upload a CSV, TSV, JSONL, JSON or Parquet file (or one compressed), or give a path"
        raise FieldError(f"{kind}_file", shown)
    return None, []


def model_reference(text: str, roots: list[Path]) -> str:
    """The default model, a hub id as typed, or a local model folder / .gguf file inside the allowed roots."""
    from tunelab.config.base import DEFAULT_MODEL

    return checked_model("model", text, roots) if text else DEFAULT_MODEL


def save_mapping(store: JobStore, project: dict[str, Any], form: dict[str, str]) -> dict[str, Any]:
    """The column mapping and chat template chosen on the data page, kept in the project's settings (a field the
    form does not send keeps its value; an empty one goes back to detection)."""
    settings = dict(project["settings"])
    columns = settings.get("data_columns") or []
    for name in MAPPING_FIELDS:
        if name not in form:  # a field this page (or API call) does not show keeps its value
            continue
        value = (form.get(name) or "").strip()
        if name != "chat_template" and value and columns and value not in columns:
            raise FormErrors({name: f"{value!r} is not a column of the data (columns: {', '.join(columns)})"})
        if name == "chat_template" and value and value not in CHAT_TEMPLATES:
            # A template file's path or Jinja text is for the CLI and config files: the app reads no file a
            # project names outside its allowed folders.
            raise FormErrors({name: f"{value[:80]!r} is not one of {', '.join(CHAT_TEMPLATES)}"})
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
    # The token takes part in the checks (push_to_hub needs one) but never reaches the config file below.
    params, errors = build_params(settings, {**values, **({"token": token} if token else {})}, config.roots)
    if params is None:
        raise FormErrors(errors)
    sealed = worker.vault.seal(token) if token else None
    folder.mkdir(parents=True)
    # The token never goes into the file: the worker hands it to the run as HF_TOKEN.
    written = {k: v for k, v in params.to_dict(redact=False).items() if k != "token"}
    if is_classifier(settings):
        written = {"task": CLASSIFIER, **written}  # the config's task picks the schema (no trainer field there)
    (folder / CONFIG_FILE).write_text(yaml.safe_dump(written, sort_keys=False), encoding="utf-8")
    shown = params.to_dict(redact=True)
    shown["trainer"] = params.trainer  # text_classification for a classifier (a class attribute, not a field)
    shown["token"] = "set" if token else None
    number = sum(1 for job in store.jobs() if job["project_id"] == project["id"]) + 1
    job_id = store.add_job(project["id"], f"{project['name']} #{number}", shown, folder, evaluate, sealed)
    worker.submit(job_id)
    return job_id
