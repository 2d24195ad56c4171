"""Files into the app, and paths out of the user's hands: uploads and "choose a path" on the data pages.

An upload is parsed from the request stream as it arrives (python-multipart's streaming parser), written straight
to `<data_dir>/uploads/<uuid>/<sanitised name>`, and refused as soon as it passes the size limit, so an oversized
file never lands whole anywhere. A path typed by the user must resolve (symlinks followed) inside one of the
allowed roots: the app's data folder and the folders given at start-up.
"""

from __future__ import annotations

import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.errors import DataError

MAX_FIELD_BYTES = 64 * 1024  # a text field of a form (the data is a file part, never a text field)
MAX_FIELDS = 32  # text fields of an upload form (the new-project form has 7)
FORM_SLACK_BYTES = 2**20  # what the text fields and part headers may add to the files' --max-upload-mb
FILE_FIELDS = ("data_file", "valid_file")  # the only file inputs there are: any other file part is refused
MAX_NAME_CHARS = 120  # of a stored upload's file name
CSRF_FIELD = "csrf_token"


class FieldError(Exception):
    """A problem with one form field, shown next to it (or as a JSON `{"errors": {field: message}}`)."""

    def __init__(self, field: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.field, self.message, self.status = field, message, status


@dataclass
class Form:
    """A parsed multipart form: its text fields and the files saved from it."""

    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)


def safe_filename(name: str) -> str:
    """The last path component of a client's file name, reduced to letters, digits, '-', '_' and '.', and to
    MAX_NAME_CHARS by shortening its stem: the suffixes stay (train.jsonl.gz keeps .jsonl.gz), as the data
    readers go by them."""
    base = re.split(r"[\\/]", name)[-1]
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", base).lstrip(".") or "upload"
    if len(cleaned) <= MAX_NAME_CHARS:
        return cleaned
    kept = ""
    for suffix in reversed(Path(cleaned).suffixes[-2:]):  # a data suffix and a compression suffix at most
        if len(suffix) > 10:  # not a file type: part of a long name with dots in it
            break
        kept = suffix + kept
    stem = cleaned[: len(cleaned) - len(kept)]
    return stem[: MAX_NAME_CHARS - len(kept)] + kept


def check_extension(field_name: str, filename: str) -> None:
    """The file types the data readers take (data/sources.py), compressed ones too (train.jsonl.gz)."""
    from tunelab.data.compression import SUFFIXES, data_suffix
    from tunelab.data.sources import EXTENSIONS

    suffix = data_suffix(Path(filename))
    if suffix not in EXTENSIONS or (Path(filename).suffix.lower() in SUFFIXES and suffix == ".parquet"):
        shown = Path(filename).suffix.lower() or "no extension"
        allowed = ", ".join(EXTENSIONS) + " (" + ", ".join(SUFFIXES) + " compressed too, but not Parquet)"
        raise FieldError(field_name, f"{filename}: {shown} files are not data files (use {allowed})")


async def receive_form(request: Any, uploads_dir: Path, max_bytes: int, expected_csrf: str | None) -> Form:
    """Stream a multipart/form-data request into a Form, saving file parts under `uploads_dir/<uuid>/`.

    Unless `expected_csrf` is None (a bearer-token call), the CSRF token (the form's field, or the X-CSRF-Token
    header) must arrive before any file - browsers send fields in page order and the forms put it first - so that
    nothing is written for a forged request; it is checked again at the end (a form without files). Only the
    FILE_FIELDS take a file, each once; the whole request may not pass the upload limit (plus FORM_SLACK_BYTES),
    however it is sent (chunked too), nor hold more than MAX_FIELDS fields. Raises FieldError on a bad file, field
    or size, CsrfError on a bad token; either way nothing saved from the request stays.
    """
    from python_multipart.multipart import MultipartParser, parse_options_header

    from tunelab.app.security import CSRF_HEADER, CsrfError, same_token

    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in options:
        raise FieldError("form", "expected a multipart/form-data form")
    declared = request.headers.get("content-length") or "0"
    if not declared.isdigit() or int(declared) > max_bytes + FORM_SLACK_BYTES:  # the client says it is too big
        raise FieldError("data_file", f"the upload is larger than the limit of {_mb(max_bytes)}", status=413)

    form = Form()
    part: dict[str, Any] = {}
    header: dict[str, bytes] = {"field": b"", "value": b""}
    saved: list[Path] = []
    counts = {"fields": 0, "bytes": 0}

    def check_csrf() -> None:
        given = form.fields.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER)
        if expected_csrf is not None and not same_token(expected_csrf, given):
            raise CsrfError()

    def on_part_begin() -> None:
        part.clear()
        part.update(headers={}, data=bytearray(), file=None, size=0)

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header["value"] += data[start:end]

    def on_header_end() -> None:
        part["headers"][header["field"].decode("latin-1").lower()] = header["value"]
        header["field"], header["value"] = b"", b""

    def on_headers_finished() -> None:
        _, disposition = parse_options_header(part["headers"].get("content-disposition", b""))
        part["name"] = disposition.get(b"name", b"").decode("utf-8", "replace")
        filename = disposition.get(b"filename")
        if filename is None:
            counts["fields"] += 1
            if counts["fields"] > MAX_FIELDS:
                raise FieldError("form", f"the form has more than {MAX_FIELDS} fields")
            return
        check_csrf()
        filename = filename.decode("utf-8", "replace")
        if not filename:  # an empty file input: the user chose no file
            part["skip"] = True
            return
        # Only the form's own file inputs, each once: any other file part would be written to disk for nothing
        if part["name"] not in FILE_FIELDS:
            raise FieldError(part["name"], f"no file is expected here (files go in {' or '.join(FILE_FIELDS)})")
        if part["name"] in form.files:
            raise FieldError(part["name"], "one file per field")
        check_extension(part["name"], filename)
        folder = uploads_dir / uuid.uuid4().hex
        folder.mkdir(parents=True)
        path = folder / safe_filename(filename)
        saved.append(folder)
        part["path"], part["file"] = path, path.open("wb")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part["size"] += end - start
        if part.get("file") is not None:
            if part["size"] > max_bytes:
                raise FieldError(part["name"], f"the file is larger than the limit of {_mb(max_bytes)}", 413)
            part["file"].write(data[start:end])
        elif not part.get("skip"):
            if part["size"] > MAX_FIELD_BYTES:
                raise FieldError(part["name"], "this field is too long")
            part["data"] += data[start:end]

    def on_part_end() -> None:
        if part.get("file") is not None:
            part["file"].close()
            form.files[part["name"]] = part["path"]
        elif not part.get("skip"):
            form.fields[part["name"]] = part["data"].decode("utf-8", "replace")

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished,
    }
    parser = MultipartParser(options[b"boundary"], callbacks)
    try:
        async for chunk in request.stream():
            # The whole request, counted as it arrives: a chunked request has no Content-Length to refuse early
            counts["bytes"] += len(chunk)
            if counts["bytes"] > max_bytes + FORM_SLACK_BYTES:
                raise FieldError("data_file", f"the upload is larger than the limit of {_mb(max_bytes)}", status=413)
            parser.write(chunk)
        parser.finalize()
        check_csrf()  # a form without files was not checked on the way
    except BaseException:
        if part.get("file") is not None:
            part["file"].close()
        for folder in saved:  # nothing half-written stays behind
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return form


def discard_uploads(form: Form) -> None:
    """Delete the folders a form's files were saved in (uploads/<uuid>/): the form was refused, nothing of it stays."""
    for path in form.files.values():
        shutil.rmtree(path.parent, ignore_errors=True)


def check_data_file(field_name: str, path: Path) -> list[str]:
    """Read a data file as training will; its columns, or a FieldError naming the file, line and column."""
    from tunelab.data.sources import read_file

    try:
        return read_file(path, "train").columns
    except DataError as err:
        raise FieldError(field_name, str(err).replace(str(path.parent) + "/", "")) from None


def resolve_user_path(field_name: str, text: str, roots: list[Path]) -> Path:
    """A path typed by the user, resolved (`..` and symlinks followed); refused unless inside an allowed root."""
    if "\x00" in text:
        raise FieldError(field_name, "not a valid path")
    try:
        path = Path(text).expanduser()
        if not path.is_absolute():
            path = roots[0] / path  # relative paths are taken from the app's data folder
        resolved = path.resolve()
        allowed = [root.resolve() for root in roots]
        if not any(resolved == root or resolved.is_relative_to(root) for root in allowed):
            shown = ", ".join(str(root) for root in allowed)
            raise FieldError(field_name, f"{text}: outside the folders this app may read ({shown})", status=403)
        found = resolved.exists()
    except (OSError, RuntimeError) as err:  # a name over 255 bytes (ENAMETOOLONG), a symlink loop, ~nobody/
        reason = getattr(err, "strerror", None) or err
        raise FieldError(field_name, f"{text[:200]}: not a usable path ({reason})") from None
    if not found:
        raise FieldError(field_name, f"{text}: no such file or folder")
    return resolved


def checked_model(field_name: str, text: str, roots: list[Path]) -> str:
    """A hub id as typed, or a local model folder / .gguf file checked to lie inside the allowed roots."""
    looks_local = text.startswith((".", "/", "~")) or text.lower().endswith(".gguf") or text.count("/") > 1
    if looks_local:
        return str(resolve_user_path(field_name, text, roots))
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", text):
        raise FieldError(field_name, f"{text!r} is neither a hub id (owner/name) nor a path")
    return text


def _mb(size: int) -> str:
    return f"{size / 2**20:.4g} MB"
