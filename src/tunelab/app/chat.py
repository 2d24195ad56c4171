"""The chat box of a finished job: `tunelab.inference.chat.ChatSession` on `load_run(<run folder>)`.

One model is kept loaded (the last one chatted with; loading is the slow part) and generation runs under a lock:
one answer at a time, as on a single device. The conversation lives in the page and comes with each message, so
two tabs never mix their histories. Answers are sampled by default (temperature 0.7, top-p 0.9, as `tunelab chat
--do-sample`): greedy decoding of a barely trained model tends to repeat one token, often a newline.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from tunelab.app.uploads import FieldError

MAX_TURNS = 40
MAX_MESSAGE_CHARS = 8000
MAX_NEW_TOKENS = 128


class ChatModels:
    """Answers chat messages with a run's model, loading it on first use and keeping the latest one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded: tuple[Path, Any, Any] | None = None

    def answer(self, folder: Path, history: list[dict[str, str]], message: str, options: Any) -> str:
        """The model's answer to `message` after `history` (user/assistant turns), decoded as `options` say."""
        from tunelab.inference.chat import ChatSession

        with self._lock:
            model, tokenizer = self._model(folder)
            session = ChatSession(model, tokenizer, options)
            session.history = list(history)
            return session.send(message)

    def _model(self, folder: Path) -> tuple[Any, Any]:
        if self._loaded is None or self._loaded[0] != folder:
            from tunelab.inference.generate import load_run

            self._loaded = None  # free the previous model before loading the next
            model, tokenizer = load_run(folder)
            self._loaded = (folder, model, tokenizer)
        return self._loaded[1], self._loaded[2]


def parse_chat(body: Any) -> tuple[list[dict[str, str]], str, Any]:
    """(history, message, GenerationParams) from a chat request body, or FieldError naming what is wrong."""
    from tunelab.inference.generate import GenerationParams

    if not isinstance(body, dict):
        raise FieldError("message", "expected a JSON object with 'message' (and 'history')")
    message = body.get("message")
    if not isinstance(message, str) or not message.strip():
        raise FieldError("message", "type a message")
    if len(message) > MAX_MESSAGE_CHARS:
        raise FieldError("message", f"the message is longer than {MAX_MESSAGE_CHARS} characters")
    history = body.get("history") or []
    if not isinstance(history, list) or len(history) > 2 * MAX_TURNS:
        raise FieldError("history", f"expected a list of at most {2 * MAX_TURNS} turns")
    turns = []
    for turn in history:
        if (
            not isinstance(turn, dict)
            or turn.get("role") not in ("user", "assistant")
            or not isinstance(turn.get("content"), str)
        ):
            raise FieldError("history", "each turn is {'role': 'user' | 'assistant', 'content': text}")
        turns.append({"role": turn["role"], "content": turn["content"][:MAX_MESSAGE_CHARS]})
    temperature = body.get("temperature", 0.7)
    if not isinstance(temperature, (int, float)) or not 0 < temperature <= 2:
        raise FieldError("temperature", "expected a number in (0, 2]")
    sample = body.get("sample", True) is not False
    options = GenerationParams(MAX_NEW_TOKENS, do_sample=sample, temperature=float(temperature), top_p=0.9)
    return turns, message.strip(), options
