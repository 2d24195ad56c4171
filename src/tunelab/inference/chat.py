"""`tunelab chat`: talk to a fine-tuned model in the terminal, through the chat template it was trained with,
with the answer streamed token by token. `/reset` clears the conversation, `/exit` (or Ctrl-D) quits."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO

from tunelab.inference.generate import GenerationParams

HELP = "/reset clears the conversation, /exit quits"


class ChatSession:
    """A conversation with one model: each answer is generated from the whole history and then joins it."""

    def __init__(self, model: Any, tokenizer: Any, options: GenerationParams | None = None, system: str | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.options = options or GenerationParams(max_new_tokens=256)
        self.system = system
        self.history: list[dict[str, str]] = []

    def reset(self) -> None:
        self.history = []

    def prompt_text(self) -> str:
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # A model trained on plain text has no turns: give it the conversation as text and let it continue.
        return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"

    def send(self, text: str, on_token: Callable[[str], None] = lambda piece: None) -> str:
        """Add the user's turn, stream the model's answer piece by piece to `on_token`, and return it whole."""
        import torch
        from transformers import TextIteratorStreamer

        self.history.append({"role": "user", "content": text})
        prompt = self.prompt_text()
        templated = bool(getattr(self.tokenizer, "chat_template", None))
        inputs = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=not templated).to(self.model.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        options = self.options
        sampling = {"temperature": options.temperature, "top_k": options.top_k, "top_p": options.top_p}
        kwargs = dict(
            **inputs,
            max_new_tokens=options.max_new_tokens,
            do_sample=options.do_sample,
            pad_token_id=self.tokenizer.pad_token_id,
            streamer=streamer,
            **(sampling if options.do_sample else {}),
        )

        def run() -> None:
            with torch.no_grad():
                self.model.generate(**kwargs)

        worker = threading.Thread(target=run, daemon=True)  # generate() feeds the streamer from this thread
        worker.start()
        pieces = []
        for piece in streamer:
            pieces.append(piece)
            on_token(piece)
        worker.join()
        answer = "".join(pieces).strip()
        self.history.append({"role": "assistant", "content": answer})
        return answer


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
        session.send(line, lambda piece: print(piece, end="", file=out, flush=True))
        print(file=out, flush=True)
