"""`tunelab chat`: talk to a fine-tuned model in the terminal, through the chat template it was trained with,
with the answer streamed token by token. `/reset` clears the conversation, `/exit` (or Ctrl-D) quits."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO

from tunelab.errors import TunelabError
from tunelab.inference.generate import GenerationParams
from tunelab.inference.openai_requests import Sampling

HELP = "/reset clears the conversation, /exit quits"


class ChatSession:
    """A conversation with one model: each answer is generated from the whole history and then joins it.

    The answer streams through the server's code path (inference/streaming.py): generation ends at the chat
    template's turn end as well as the model's EOS, an error in the generating thread comes back to the caller
    (never a reader left waiting), and the oldest exchanges are left out when the history outgrows the context.
    """

    def __init__(self, model: Any, tokenizer: Any, options: GenerationParams | None = None, system: str | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.options = options or GenerationParams(max_new_tokens=256)
        self.system = system
        self.history: list[dict[str, str]] = []
        self._lock = threading.Lock()
        if system and self.templated:
            try:  # Gemma's template, for one, refuses system messages: say so now, not at the first message
                self.tokenizer.apply_chat_template(
                    [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}], tokenize=False
                )
            except Exception as err:  # noqa: BLE001 - jinja2's errors and the template's own raise_exception
                raise TunelabError(f"chat: this model's chat template takes no system message ({err})") from None

    @property
    def templated(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def reset(self) -> None:
        self.history = []

    def prompt_text(self, history: list[dict[str, str]] | None = None) -> str:
        history = self.history if history is None else history
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + history
        if self.templated:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # A model trained on plain text has no turns: give it the conversation as text and let it continue.
        return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"

    def send(self, text: str, on_token: Callable[[str], None] = lambda piece: None) -> str:
        """Add the user's turn, stream the model's answer piece by piece to `on_token`, and return it whole. If
        generating fails, the conversation is left as it was and the error raised."""
        from tunelab.inference.streaming import Generation

        self.history.append({"role": "user", "content": text})
        try:
            ids, max_tokens = self._prompt_ids()
            options = self.options
            sampling = Sampling(
                max_tokens=max_tokens,
                temperature=options.temperature if options.do_sample else 0.0,
                top_p=options.top_p,
                top_k=options.top_k,
                stop=[] if self.templated else ["\nUser:"],  # plain text: the model would write the user's turn
            )
            pieces = []
            for piece in Generation(self.model, self.tokenizer, self._lock, ids, sampling):
                pieces.append(piece)
                on_token(piece)
        except BaseException:
            self.history.pop()
            raise
        answer = "".join(pieces).strip()
        self.history.append({"role": "assistant", "content": answer})
        return answer

    def _prompt_ids(self) -> tuple[Any, int]:
        """The prompt's token ids and how many tokens the answer may take: the oldest exchanges are left out
        until the prompt and the answer fit the model's context (the whole history stays in self.history)."""
        context = getattr(self.model.config, "max_position_embeddings", None)
        wanted = self.options.max_new_tokens
        history = self.history
        while True:
            text = self.prompt_text(history)
            ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=not self.templated)["input_ids"]
            length = int(ids.shape[1])
            if context is None or length + wanted <= context:
                return ids.to(self.model.device), wanted
            if len(history) > 1:
                history = history[2:] if history[0]["role"] == "user" and len(history) > 2 else history[1:]
                continue
            if length < context:  # the message alone fits: a shorter answer
                return ids.to(self.model.device), context - length
            raise TunelabError(f"chat: the message is {length} tokens; this model's context is {context} tokens")


def chat_loop(
    session: ChatSession, read: Callable[[str], str] = input, out: TextIO = sys.stdout, name: str = "model"
) -> None:
    """The terminal conversation: read a line, answer it streamed, until /exit or end of input."""
    print(f"chatting with {name} ({HELP})", file=out, flush=True)
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            print(file=out)
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            session.reset()
            print("(conversation cleared)", file=out, flush=True)
            continue
        if not line:
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]} ({HELP})", file=out, flush=True)
            continue
        print("assistant> ", end="", file=out, flush=True)
        try:
            session.send(line, lambda piece: print(piece, end="", file=out, flush=True))
        except TunelabError as err:  # a message longer than the context: say so, and keep the conversation
            print(f"({err})", end="", file=out, flush=True)
        print(file=out, flush=True)
