"""Images in chat rows, for vision-language models: where each comes from, checked before training, and how the
model's processor writes it into the token ids and into a batch's pixel tensors.

A user turn's content may hold image parts in the forms the tools write them: transformers' and TRL's
`{"type": "image", "image": ...}` (or `url` / `path`), OpenAI's `{"type": "image_url", "image_url": {"url":
...}}`, and TRL's bare `{"type": "image"}` taking the row's `images` column in order; LLaMA-Factory's `<image>` in
a text turn takes it the same way. An image is a file (a path relative to the data file's folder, or absolute), a
`data:image/...;base64,` URI, or bytes (a Parquet or hub dataset's image column).

The chat template writes each image as the model's image token; before the text is tokenized, each is replaced by
the text the processor writes for that very image (Qwen2-VL: one `<|image_pad|>` per 28x28 patch), where the
processor says it goes (ImageCodec.expand), so the tokens are the processor's own and the example's length is exact
before training. The pixels are computed again from the images when a batch asks (ImageCodec.batch_inputs): the
prepared data holds where each image is, never its pixels.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tunelab.errors import ConfigError

IMAGE_COLUMNS = ("images", "image")  # TRL's column, and the single-image spelling of many hub datasets
IMAGE_TAG = "<image>"  # LLaMA-Factory's and ShareGPT-style datasets' mark of where an image goes in a text turn


class ImageProblem(ValueError):
    """Why an image part cannot be used (the caller names the row and column)."""


@dataclass(frozen=True)
class ImageSpan:
    """One image of an example: where it is (a path, or the bytes themselves) and the tokens it takes, from
    `start` on."""

    ref: str | bytes
    start: int
    count: int


def image_ref(part: dict) -> Any:
    """What an image part points at (None: a bare `{"type": "image"}`, taking the row's `images` column)."""
    kind = part.get("type")
    if kind == "image_url" or kind == "input_image":
        value = part.get("image_url")
        return value.get("url") if isinstance(value, dict) else value
    for key in ("image", "url", "path"):
        if part.get(key) is not None:
            return part[key]
    return None


def image_parts(messages: list[dict[str, Any]]) -> list[tuple[int, Any]]:
    """(message number, what it points at) of every image part of a conversation, in order."""
    return [
        (number, part["image"])
        for number, message in enumerate(messages, start=1)
        if isinstance(message["content"], list)
        for part in message["content"]
        if part["type"] == "image"
    ]


def as_template_reads(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as the chat template reads them: an image part is {"type": "image"} (where it points is not for the
    template: bytes would only slow rendering down)."""
    if not any(isinstance(m["content"], list) for m in messages):
        return messages
    return [
        {**m, "content": [p if p["type"] == "text" else {"type": "image"} for p in m["content"]]}
        if isinstance(m["content"], list)
        else m
        for m in messages
    ]


def content_text(content: Any) -> str:
    """A turn's content as text, for what reads no images (a report, a reward model's template): its text parts
    joined, each image written as [image]."""
    if not isinstance(content, list):
        return str(content)
    return "".join(part.get("text", "") if part.get("type") == "text" else "[image]" for part in content)


def checked_ref(value: Any, folder: Path | None) -> str | bytes:
    """An image as the prepared data keeps it: an absolute path of a file that opens as an image, or its bytes.
    ImageProblem says what is wrong (missing, a URL, not an image)."""
    if isinstance(value, dict):  # a Parquet / hub dataset Image column: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytearray | memoryview):
        value = bytes(value)
    if isinstance(value, bytes):
        _opened(value, "the image's bytes")
        return value
    if not isinstance(value, str) or not value.strip():
        raise ImageProblem(f"an image given as {type(value).__name__}, not a path, data: URI or bytes")
    if value.startswith("data:"):
        head, _, payload = value.partition(",")
        if ";base64" not in head:
            raise ImageProblem("a data: URI that is not base64")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ImageProblem("a data: URI whose base64 does not decode") from None
        _opened(data, "the data: URI")
        return data
    if value.startswith(("http://", "https://")):
        raise ImageProblem(f"image {value!r} is a URL: download the images and give their paths (nothing is fetched)")
    path = Path(value.removeprefix("file://")).expanduser()
    if not path.is_absolute() and folder is not None:
        path = folder / path
    if not path.is_file():
        raise ImageProblem(f"image {value!r} not found (looked for {path})")
    _opened(path, f"image {value!r}")
    return str(path.resolve())


def _opened(source: Path | bytes, what: str) -> None:
    """Decoded whole (verify() reads a PNG's checksums but not a JPEG's data: a cut-short JPEG passes it)."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageProblem(f"{what} is not an image PIL can read ({type(err).__name__})") from None


def open_image(ref: str | bytes) -> Any:
    """The image as an RGB PIL image (what every processor takes)."""
    with Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref) as image:
        return image.convert("RGB")


class StoredImage(str):
    """The path of image bytes written beside prepared data (stored_ref), knowing its name there: the data cache
    keeps the name and reads it back against the folder the entry is read from (a moved cache still finds it)."""

    name: str

    def __new__(cls, path: str, name: str = "") -> StoredImage:
        stored = super().__new__(cls, path)
        stored.name = name
        return stored


def stored_image(ref: bytes, folder: Path, final: Path) -> StoredImage:
    """Image bytes written into `folder` (once per distinct image), named by their path in `final`, where `folder`
    will be once the prepared data is complete."""
    name = stored_ref(ref, folder)
    return StoredImage(str(final / name), name)


def stored_ref(ref: bytes, folder: Path) -> str:
    """Image bytes as a stored token table keeps them: a file in `folder`/images named by their hash, given by that
    name relative to `folder` (the prepared data's folder moves into the cache once complete)."""
    name = f"images/{hashlib.sha256(ref).hexdigest()[:32]}"
    target = folder / name
    if not target.exists():
        target.parent.mkdir(exist_ok=True)
        partial = target.with_suffix(".partial")
        partial.write_bytes(ref)
        partial.replace(target)
    return name


_PROBE_TEXT = "\x00tunelab-probe\x00"  # a text no template adds


class ImageCodec:
    """How one model's processor turns images into tokens and pixels, checked on a probe image.

    transformers' processors write each image by replacing their `image_token` in the text (Qwen2-VL's
    `<|image_pad|>`, LLaVA's `<image>`) with a text of its own (a run of that token, Gemma 3's with the newlines around
    it, SmolVLM's with its tiles' tokens), and say where (`return_text_replacement_offsets`): `expand` makes that very
    text, so the tokenizer then sees what the processor's would, and the answers' spans move with it. `token_types`:
    per-token inputs the model needs beside the ids (Qwen2-VL's mm_token_type_ids, Gemma 3's token_type_ids), 1 on the
    image tokens `image_token_ids`. (A template that writes nothing for a plain string, LLaVA's and SmolVLM's own, is
    taught to first: data/templates.with_string_parts.)"""

    def __init__(self, processor: Any, template: str, tokenizer: Any) -> None:
        from tunelab.data.templates import render_template

        self.processor = processor
        self.image_token = getattr(processor, "image_token", None)
        name = type(processor).__name__
        if not isinstance(self.image_token, str) or not self.image_token:
            raise ConfigError(f"the model's processor ({name}) names no image token: its images are not supported yet")
        with_image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _PROBE_TEXT}]}]
        try:
            marked = render_template(template, with_image, tokenizer)
        except Exception as err:  # noqa: BLE001 - jinja2's errors and the template's own raise_exception
            raise ConfigError(f"the chat template cannot write an image part ({err})") from None
        if self.image_token not in marked:
            raise ConfigError(
                f"the chat template writes nothing for an image part (no {self.image_token!r}): use the model's own, "
                "chat_template: tokenizer"
            )
        self.images_kwargs = _images_kwargs(processor)
        probe = _probe_image()
        out = self._processed(self.image_token, [probe], "np")
        if "text_replacement_offsets" not in out:
            raise ConfigError(f"the model's processor ({name}) does not say where an image's tokens go: not supported")
        left = ("input_ids", "attention_mask", "labels", "text_replacement_offsets")
        shaped = {k: v for k, v in out.items() if k not in left}
        self.image_keys = [k for k, v in shaped.items() if not _per_token(v, out)]
        self.token_types = [k for k, v in shaped.items() if _per_token(v, out) and np.isin(v, (0, 1)).all()]
        ids = out["input_ids"][0].tolist()
        if ids == tokenizer(self.image_token, add_special_tokens=False)["input_ids"]:
            raise ConfigError(
                f"the model's processor ({name}) writes an image as {self.image_token!r} alone: a model whose images "
                "reach it otherwise (cross-attention) is not supported yet"
            )
        self.image_token_ids = sorted(
            {t for k in self.token_types for t, flag in zip(ids, out[k][0].tolist(), strict=True) if flag}
        )
        # what a model must never write itself (its image features would then not match its image tokens)
        written = tokenizer(self.image_token, add_special_tokens=False)["input_ids"]
        self.placeholder_ids = sorted({*self.image_token_ids, *(written if len(written) == 1 else [])})
        if self.token_types and not self.image_token_ids:
            raise ConfigError(f"the model's processor ({name}) marks no image token in {self.token_types[0]}")
        # The splice (expand) must give the processor's own tokens: PaliGemma's, say, also adds text of its own.
        probe_text = f"A {self.image_token} B"
        spliced = self._spliced(probe_text, [], [probe])[0]
        direct = self.processor(text=[probe_text], images=[[probe]], add_special_tokens=False)["input_ids"][0]
        if tokenizer(spliced, add_special_tokens=False)["input_ids"] != list(direct):
            raise ConfigError(
                f"the model's processor ({name}) writes more than its images into a text: not supported yet"
            )
        again = self.pixels([[probe]], "np")
        if any(not np.array_equal(np.asarray(again[k]), np.asarray(out[k])) for k in self.image_keys):
            raise ConfigError(f"the model's processor ({name}) makes other pixels than its image processor alone")

    def _processed(self, text: str, images: list[Any], tensors: str | None = None) -> dict[str, Any]:
        return self.processor(
            text=[text],
            images=[images],
            add_special_tokens=False,
            return_text_replacement_offsets=True,
            return_tensors=tensors,
        )

    def expand(
        self, text: str, spans: list[tuple[int, int]], refs: list[str | bytes]
    ) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
        """One example's text with each image written as the processor writes it, its trained spans moved along,
        and each image's characters; ImageProblem when its text holds another number of image places than it has
        images, or an image the processor cannot take."""
        count = text.count(self.image_token)
        if count != len(refs):
            raise ImageProblem(
                f"its text holds {count} image place(s) ({self.image_token!r}) for {len(refs)} image(s): a turn's "
                f"text writes {self.image_token!r} itself"
            )
        if not refs:
            return text, spans, []
        try:
            return self._spliced(text, spans, [open_image(ref) for ref in refs])
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise ImageProblem(f"the model's processor cannot take its images ({err})") from None

    def _spliced(
        self, text: str, spans: list[tuple[int, int]], images: list[Any]
    ) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
        replaced = sorted(self._processed(text, images)["text_replacement_offsets"][0], key=lambda r: r["span"])
        pieces, marks, cursor, shifts, length = [], [], 0, [], 0
        for item in replaced:
            (start, end), replacement = item["span"], item["replacement"]
            pieces.append(text[cursor:start])
            length += start - cursor
            marks.append((length, length + len(replacement)))
            length += len(replacement)
            pieces.append(replacement)
            shifts.append((end, len(replacement) - (end - start)))
            cursor = end
        pieces.append(text[cursor:])
        moved = [(s + _shift(shifts, s), e + _shift(shifts, e)) for s, e in spans]
        return "".join(pieces), moved, marks

    def pixels(self, images: list[list[Any]], tensors: str = "pt") -> dict[str, Any]:
        """The image processor's outputs for images nested per row, with the processor's own settings for it."""
        out = self.processor.image_processor(images=images, return_tensors=tensors, **self.images_kwargs)
        return {key: out[key] for key in self.image_keys if key in out}

    def batch_inputs(self, images: list[list[str | bytes]], input_ids: Any) -> dict[str, Any]:
        """A batch's image inputs: the pixels of each row's images (nested per row, as processors take them), and the
        per-token types the model reads beside the ids."""
        import torch

        out: dict[str, Any] = {}
        if any(images):
            out.update(self.pixels([[open_image(ref) for ref in row] for row in images]))
        marks = torch.isin(input_ids, torch.tensor(self.image_token_ids, dtype=input_ids.dtype))
        for key in self.token_types:
            out[key] = marks.long()
        return out


def codec_or_reason(processor: Any, template: str | None, tokenizer: Any) -> tuple[ImageCodec | None, str | None]:
    """How a model's images become tokens with this template, or why they cannot (said by the first row that shows
    one, not by a run with none); (None, None) for a model that reads no images."""
    if processor is None:
        return None, None
    if template is None:
        return None, "images need a chat template (the rows are plain text with no prompt column)"
    try:
        return ImageCodec(processor, template, tokenizer), None
    except ConfigError as err:
        return None, str(err)
    except Exception as err:  # noqa: BLE001 - the processor's own code on a probe image: a text-only run goes on
        return None, f"the model's processor fails on a probe image ({type(err).__name__}: {err})"


def file_signatures(refs: Any) -> dict[str, tuple[int, int]]:
    """The user's image files among `refs` (paths; bytes, and bytes stored beside prepared data, have none), each
    with its size and time now."""
    files = sorted({ref for ref in refs if isinstance(ref, str) and not isinstance(ref, StoredImage)})
    return {path: (os.stat(path).st_size, os.stat(path).st_mtime_ns) for path in files}


def check_unchanged(signatures: dict[str, tuple[int, int]]) -> None:
    """ValueError when an image file is gone or changed since its signature was taken (prepared data that names it
    is stale: the data cache prepares it again)."""
    for path, signature in signatures.items():
        try:
            stat = os.stat(path)
        except OSError:
            raise ValueError(f"image {path} is gone since the data was prepared") from None
        if (stat.st_size, stat.st_mtime_ns) != tuple(signature):
            raise ValueError(f"image {path} changed since the data was prepared")


def _images_kwargs(processor: Any) -> dict[str, Any]:
    """The image settings the processor passes its image processor (InternVL's crop_to_patches, say), which calling
    the image processor alone would leave at its own defaults."""
    try:
        merged = processor._merge_kwargs(tokenizer_init_kwargs=getattr(processor.tokenizer, "init_kwargs", {}))
        return {k: v for k, v in merged["images_kwargs"].items() if k != "return_tensors"}
    except (AttributeError, KeyError, TypeError):  # an older processor: none of its own (checked on the probe)
        return {}


def _shift(shifts: list[tuple[int, int]], position: int) -> int:
    """How far a character at `position` moves: the growth of every replacement that ends at or before it."""
    return sum(growth for end, growth in shifts if end <= position)


def _per_token(value: Any, out: dict[str, Any]) -> bool:
    return getattr(value, "shape", None) == getattr(out["input_ids"], "shape", None)


def _probe_image() -> Any:
    side = 224  # large enough that every processor writes it as several tokens
    gradient = np.linspace(0, 255, side * side * 3, dtype=np.float64).reshape(side, side, 3)
    return Image.fromarray(gradient.astype(np.uint8))


def images_tokens(spans: list[ImageSpan] | None, limit: int) -> tuple[list[ImageSpan], int]:
    """The images an example cut to `limit` tokens keeps (wholly inside), and where the cut falls: before an image
    it would split, so that no image loses some of its tokens."""
    kept = []
    for span in spans or []:
        if span.start + span.count <= limit:
            kept.append(span)
        else:
            return kept, min(limit, span.start)
    return kept, limit
