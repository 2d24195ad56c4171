"""The models behind a finished job's boxes: the chat box (`inference.chat.ChatSession` on `load_run(<run>)`),
base beside tuned (the same prompt to the base model and the run, same decoding and
seed), and a classifier's predict box (`inference.predict.probabilities`).

One run is kept loaded (the last one used; loading is the slow part), with its base model when the run is a full
fine-tune (a LoRA run answers as its base with the adapter switched off, on the same weights). Generation runs
under a lock: one answer at a time, as on a single device. The conversation lives in the page and comes with
each message, so two tabs never mix their histories. Chat answers are sampled by default (temperature 0.7, top-p
0.9, as `tunelab chat --do-sample`): greedy decoding of a barely trained model tends to repeat one token.
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
    """Answers with a run's model (or its base), loading it on first use and keeping the latest one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded: tuple[Path, Any, Any] | None = None
        self._base: tuple[str, Any, Any] | None = None  # a full fine-tune's base model, loaded when asked for

    def answer(
        self, folder: Path, history: list[dict[str, str]], message: str, options: Any, seed: int | None = None
    ) -> str:
        """The model's answer to `message` after `history` (user/assistant turns), decoded as `options` say."""
        with self._lock:
            model, tokenizer = self._model(folder)
            return _reply(model, tokenizer, history, message, options, seed)

    def side_by_side(self, folder: Path, message: str, options: Any, seed: int = 0) -> dict[str, str]:
        """{"base": ..., "tuned": ...}: one prompt answered by the base model and the run, same decoding and seed."""
        from tunelab.outputs import base_model_of

        with self._lock:
            model, tokenizer = self._model(folder)
            tuned = _reply(model, tokenizer, [], message, options, seed)
            if hasattr(model, "disable_adapter"):  # a LoRA run: the base is the same weights without the adapter
                with model.disable_adapter():
                    base = _reply(model, tokenizer, [], message, options, seed)
            else:
                name = base_model_of(folder)
                if self._base is None or self._base[0] != name:
                    from tunelab.inference.generate import load_run

                    self._base = None
                    self._base = (name, *load_run(name))
                base = _reply(self._base[1], self._base[2], [], message, options, seed)
        return {"base": base, "tuned": tuned}

    def classify(self, folder: Path, text: str) -> dict[str, float]:
        """Every label's probability for `text`, from a text-classification run."""
        from tunelab.inference.predict import probabilities

        with self._lock:
            if self._loaded is None or self._loaded[0] != folder:
                from tunelab.inference.predict import load_classifier

                self._loaded = self._base = None
                self._loaded = (folder, *load_classifier(folder))
            return probabilities(self._loaded[1], self._loaded[2], [text])[0]

    def release(self) -> None:
        """Drop the loaded models (a job is about to train: on a GPU machine they would hold its memory). The next
        chat message loads its run again."""
        with self._lock:
            if self._loaded is None and self._base is None:
                return
            self._loaded = self._base = None
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _model(self, folder: Path) -> tuple[Any, Any]:
        if self._loaded is None or self._loaded[0] != folder:
            from tunelab.inference.generate import load_run

            self._loaded = self._base = None  # free the previous models before loading the next
            model, tokenizer = load_run(folder)
            self._loaded = (folder, model, tokenizer)
        return self._loaded[1], self._loaded[2]


def _reply(model: Any, tokenizer: Any, history: list, message: str, options: Any, seed: int | None) -> str:
    from tunelab.inference.chat import ChatSession

    if seed is not None:  # the same seed before each of two answers: the same sampling draws for both
        import torch

        torch.manual_seed(seed)
    session = ChatSession(model, tokenizer, options)
    session.history = list(history)
    return session.send(message)


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
