"""Chat templates: turning a message list into text, with the character spans of the assistant answers.

The templates are Hugging Face-compatible Jinja (templates/*.jinja, or the tokenizer's own for `tokenizer`),
so the one used for training is saved with the tokenizer and chat/serve/generate format prompts the same way.
The renderer returns the text and the trainable spans together (formatting is data, masking goes with it).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError

TEMPLATE_DIR = Path(__file__).parent / "templates"
BUILTIN = ("none", "zephyr", "chatml", "alpaca")


@dataclass
class Rendered:
    """Formatted text and the [start, end) character spans the loss is computed on."""

    text: str
    spans: list[tuple[int, int]]


@functools.cache
def builtin_template(name: str) -> str:
    """The Jinja source of one of tunelab's own templates."""
    return (TEMPLATE_DIR / f"{name}.jinja").read_text(encoding="utf-8")


def template_source(name: str, tokenizer: Any) -> str:
    """Jinja source for a template name; `tokenizer` means the model's own."""
    if name == "tokenizer":
        source = getattr(tokenizer, "chat_template", None)
        if not source:
            raise ConfigError(
                "chat_template=tokenizer, but this model's tokenizer has no chat template: "
                "use chatml or zephyr instead"
            )
        return source if isinstance(source, str) else source.get("default", next(iter(source.values())))
    if name not in BUILTIN:
        raise ConfigError(f"unknown chat template {name!r}: use one of none, zephyr, chatml, tokenizer, alpaca")
    return builtin_template(name)


def render_template(source: str, messages: list[dict], tokenizer: Any, add_generation_prompt: bool = False) -> str:
    """Render messages with a Jinja chat template exactly as transformers does at inference time."""
    return tokenizer.apply_chat_template(
        messages, chat_template=source, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def render_messages(messages: list[dict], source: str, tokenizer: Any) -> Rendered:
    """Render a conversation and find each assistant answer's span (its content and closing tokens).

    A template is rendered up to each assistant turn with the generation prompt, and up to its end without;
    the difference is the answer. Templates that rewrite earlier turns (rare) fall back to locating the answer's
    content in the full text.
    """
    text = render_template(source, messages, tokenizer)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_template(source, messages[:i], tokenizer, add_generation_prompt=True) if i else ""
        upto = render_template(source, messages[: i + 1], tokenizer)
        if i and text.startswith(upto) and upto.startswith(before) and len(before) >= cursor:
            start, end = len(before), len(upto)
        else:
            start = text.find(message["content"], cursor)
            if start < 0:
                continue
            end = start + len(message["content"])
            eos = getattr(tokenizer, "eos_token", None)
            if eos and text.startswith(eos, end):
                end += len(eos)
        spans.append((start, end))
        cursor = end
    return Rendered(text, spans)


def render_text(text: str, eos_token: str | None) -> Rendered:
    """Plain text rows are trained on whole; the end-of-sequence token is appended when asked for."""
    if eos_token and not text.endswith(eos_token):
        text = text + eos_token
    return Rendered(text, [(0, len(text))])
