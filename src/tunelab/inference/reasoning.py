"""Reasoning in a served model's answer, returned apart from the answer as OpenAI-compatible servers return it.

Reasoning models (DeepSeek-R1 and its distillations, Qwen3, QwQ, and any model tunelab trained on reasoning
traces: data/templates.py writes them so) write their reasoning inside `<think>...</think>` before the answer.
`tunelab serve` reads it out as vLLM's `deepseek_r1` and `qwen3` reasoning parsers do, and returns it as
`message.reasoning` (vLLM's name now) and `message.reasoning_content` (DeepSeek's API, llama.cpp's server and
vLLM's older name), with the answer alone as `content`; streamed, as `delta.reasoning` / `delta.reasoning_content`
chunks before the content's.

An answer that does not begin with `<think>` is all content (`think`, `qwen3`: Qwen3 may answer without
reasoning). When the chat template opened the block itself (its generation prompt ends with `<think>`), the answer
begins inside it; `deepseek_r1` takes every answer to begin inside it, as vLLM's parser of that name does (the
R1 models' templates open the block, and the models may skip writing `<think>`). An answer cut off inside the
block (max_tokens) is all reasoning, and has no content.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunelab.data.templates import THINK_CLOSE, THINK_OPEN

PARSERS = ("think", "deepseek_r1", "qwen3", "none")  # vLLM's names read the same <think> form here


@dataclass(frozen=True)
class Thinking:
    """The markers a model writes its reasoning between, before its answer."""

    open: str = THINK_OPEN
    close: str = THINK_CLOSE
    begins_inside: bool = False  # every answer begins inside the block, whether or not it writes the open marker

    def parts(self, text: str, whole: bool = True) -> tuple[str | None, str | None]:
        """(reasoning, content) of an answer, or of the answer so far (`whole` False): what could still turn out
        to be a marker is held back, and None says a part has not begun (or, whole, that there is none). Each
        part read from a longer text begins with the part read from a shorter one, so a stream can send what is
        new each time, and the parts streamed add up to the whole answer's."""
        lead = text.lstrip()
        if lead.startswith(self.open):
            inner = lead[len(self.open) :]
        elif not whole and self.open.startswith(lead):  # nothing yet, or the start of the marker
            return None, None
        elif self.begins_inside:
            inner = lead
        else:
            return None, text
        end = inner.find(self.close)
        if end >= 0:
            content = inner[end + len(self.close) :].lstrip("\n")
            return inner[:end].strip("\n") or None, content or (None if whole else "")
        if whole:
            return inner.strip("\n") or None, None
        held = next((n for n in range(len(self.close) - 1, 0, -1) if inner.endswith(self.close[:n])), 0)
        # trailing newlines too: the block's last one goes with the close marker
        return inner[: len(inner) - held].strip("\n") or None, None

    def read(self, text: str, cut: bool = False) -> tuple[str | None, str | None]:
        """(reasoning, answer) of a whole answer, for a person (chat, generate) rather than an API: the answer is ""
        when the block closed with nothing after it, and None only when the model stopped inside its reasoning
        (which is then without the start of a close marker it had begun). `cut`: the answer was cut off (its
        token budget), so one that is the start of the open marker (`<thin`) was reasoning about to begin."""
        if cut and text.strip() and self.open.startswith(text.strip()):
            return None, None
        reasoning, content = self.parts(text)
        if content is not None:
            return reasoning, content
        if self.close in text:
            return reasoning, ""
        return self.parts(text, whole=False)[0], None

    def opened_by(self, prompt: str) -> str:
        """The open marker when the templated prompt ends inside a think block (the answer begins in it), else ""."""
        return self.open if prompt.rstrip().endswith(self.open) else ""

    @property
    def markers(self) -> tuple[str, ...]:
        return self.open, self.close


THINK = Thinking()
BEGINS_INSIDE = Thinking(begins_inside=True)


def thinking_for(parser: str) -> Thinking | None:
    """The reasoning form `tunelab serve --reasoning-parser` names (PARSERS); None for "none"."""
    if parser not in PARSERS:
        raise ValueError(f"unknown reasoning parser {parser!r}: use one of {', '.join(PARSERS)}")
    return {"none": None, "deepseek_r1": BEGINS_INSIDE}.get(parser, THINK)


def reasoning_fields(reasoning: str | None) -> dict[str, Any]:
    """A message's (or a streamed delta's) reasoning under both names clients read it by; nothing when none."""
    return {} if reasoning is None else {"reasoning": reasoning, "reasoning_content": reasoning}
