"""Images in chat rows, for vision-language models: where each comes from, checked before training, and how the
model's processor writes it into the token ids and into a batch's pixel tensors.

A user turn's content may hold image parts in the forms the tools write them: transformers' and TRL's
`{"type": "image", "image": ...}` (or `url` / `path`), OpenAI's `{"type": "image_url", "image_url": {"url":
...}}`, and TRL's bare `{"type": "image"}` taking the row's `images` column in order; LLaMA-Factory's `<image>` in
a text turn takes it the same way. An image is a file (a path relative to the data file's folder, or absolute), a
`data:image/...;base64,` URI, or bytes (a Parquet or hub dataset's image column).

The chat template writes each image as its placeholder (`<|vision_start|><|image_pad|><|vision_end|>` for Qwen2-VL,
`<image>` for LLaVA); the text is tokenized and masked as any chat is (data/tokenize.py), then each placeholder is
replaced by what the processor makes of that very image (Qwen2-VL: one `<|image_pad|>` per 28x28 patch), so the
example's token count is exact before training and the pixels are computed again from the image when a batch asks
(`ImageCodec.batch_inputs`): the prepared data holds where each image is, never its pixels.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageProblem(f"{what} is not an image PIL can read ({type(err).__name__})") from None


def open_image(ref: str | bytes) -> Any:
    """The image as an RGB PIL image (what every processor takes)."""
    from PIL import Image

    with Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref) as image:
        return image.convert("RGB")


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
    """How one model's processor turns images into tokens and pixels, found by trying it on a probe image.

    `placeholder`: the token ids the chat template writes for an image (its text, found by rendering a turn with and
    without an image part, stripped of the spaces around it). `expanded(image)`: what the processor writes for that
    image in their place. `token_types`: per-token inputs the model needs beside the ids (Qwen2-VL's
    mm_token_type_ids, Gemma 3's token_type_ids), 1 on the image's tokens."""

    def __init__(self, processor: Any, template: str, tokenizer: Any) -> None:
        from tunelab.data.templates import render_template

        self.processor = processor
        with_image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _PROBE_TEXT}]}]
        without = [{"role": "user", "content": [{"type": "text", "text": _PROBE_TEXT}]}]
        try:
            marked = render_template(template, with_image, tokenizer)
            plain = render_template(template, without, tokenizer)
        except Exception as err:  # noqa: BLE001 - a template that cannot take an image part at all
            raise ConfigError(f"the chat template cannot write an image part ({err})") from None
        start = len(_common_prefix(marked, plain))
        end = len(marked) - len(_common_prefix(marked[start:][::-1], plain[start:][::-1]))
        self.placeholder_text = marked[start:end].strip()
        if not self.placeholder_text or _PROBE_TEXT in self.placeholder_text:
            raise ConfigError(
                "the chat template writes nothing for an image part (a text model's template): use the model's own, "
                "chat_template: tokenizer"
            )
        self.placeholder = tokenizer(self.placeholder_text, add_special_tokens=False)["input_ids"]
        probe = _probe_image()
        out = self._processed(probe)
        self.image_keys = [k for k in out if k not in ("input_ids", "attention_mask") and not _per_token(out[k], out)]
        self.token_types = [k for k in out if k not in ("input_ids", "attention_mask") and _per_token(out[k], out)]
        ids = out["input_ids"][0].tolist()
        if ids == self.placeholder:
            raise ConfigError(
                f"the processor writes an image as its placeholder {self.placeholder_text!r} alone: a model whose "
                "images reach it otherwise (cross-attention) is not supported yet"
            )
        self.image_token_ids = sorted(
            {t for k in self.token_types for t, flag in zip(ids, out[k][0].tolist(), strict=True) if flag}
        )

    def _processed(self, image: Any) -> dict[str, Any]:
        return self.processor(
            text=[self.placeholder_text], images=[[image]], add_special_tokens=False, return_tensors="np"
        )

    def expanded(self, image: Any) -> list[int]:
        return self._processed(image)["input_ids"][0].tolist()

    def expand(
        self, ids: np.ndarray, trained: np.ndarray, refs: list[str | bytes]
    ) -> tuple[np.ndarray, np.ndarray, list[ImageSpan]]:
        """One example's ids and trained flags with each image's placeholder replaced by its tokens (never
        trained); ImageProblem when the text holds another number of placeholders than the example has images."""
        starts = _occurrences(ids, self.placeholder)
        if len(starts) != len(refs):
            raise ImageProblem(
                f"its text holds {len(starts)} image place(s) ({self.placeholder_text!r}) for {len(refs)} image(s): "
                f"a turn's text writes {self.placeholder_text!r} itself"
            )
        pieces_ids, pieces_trained, spans = [], [], []
        cursor, length = 0, 0
        for start, ref in zip(starts, refs, strict=True):
            pieces_ids.append(ids[cursor:start])
            pieces_trained.append(trained[cursor:start])
            length += start - cursor
            tokens = self.expanded(open_image(ref))
            spans.append(ImageSpan(ref, length, len(tokens)))
            pieces_ids.append(np.asarray(tokens, dtype=ids.dtype))
            pieces_trained.append(np.zeros(len(tokens), dtype=trained.dtype))
            length += len(tokens)
            cursor = start + len(self.placeholder)
        pieces_ids.append(ids[cursor:])
        pieces_trained.append(trained[cursor:])
        return np.concatenate(pieces_ids), np.concatenate(pieces_trained), spans

    def batch_inputs(self, images: list[list[str | bytes]], input_ids: Any) -> dict[str, Any]:
        """A batch's image inputs: the pixels of each row's images (nested per row, as processors take them), and the
        per-token types the model reads beside the ids."""
        import torch

        out: dict[str, Any] = {}
        if any(images):
            opened = [[open_image(ref) for ref in row] for row in images]
            pixels = self.processor.image_processor(images=opened, return_tensors="pt")
            out.update({key: pixels[key] for key in self.image_keys if key in pixels})
        marks = torch.isin(input_ids, torch.tensor(self.image_token_ids, dtype=input_ids.dtype))
        for key in self.token_types:
            out[key] = marks.long()
        return out


def _per_token(value: Any, out: dict[str, Any]) -> bool:
    return getattr(value, "shape", None) == out["input_ids"].shape


def _common_prefix(a: str, b: str) -> str:
    size = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        size += 1
    return a[:size]


def _occurrences(ids: np.ndarray, pattern: list[int]) -> list[int]:
    """Where `pattern` starts in `ids`, left to right, without overlaps."""
    if not pattern or len(ids) < len(pattern):
        return []
    candidates = np.flatnonzero(ids[: len(ids) - len(pattern) + 1] == pattern[0]).tolist()
    found, after = [], 0
    for start in candidates:
        if start >= after and ids[start : start + len(pattern)].tolist() == pattern:
            found.append(start)
            after = start + len(pattern)
    return found


def _probe_image() -> Any:
    from PIL import Image

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


def row_images(spans: list[ImageSpan] | None) -> list[str | bytes]:
    return [span.ref for span in spans or []]
