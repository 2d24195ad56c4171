"""`tunelab chat`: talk to a fine-tuned model in the terminal, through the chat template it was trained with,
with the answer streamed token by token. `/reset` clears the conversation, `/exit` (or Ctrl-D) quits.

A reasoning model's `<think>...</think>` is shown apart from its answer (`thinking>`, dimmed in a terminal) or
not at all (`--hide-reasoning`), read as `tunelab serve` reads it (reasoning.py), and kept in the conversation
as the model's reasoning, which the template writes back as it did in training (templates.with_reasoning)."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO

from tunelab.config.llm import template_variables
from tunelab.data.templates import template_text, with_reasoning
from tunelab.errors import TunelabError
from tunelab.inference.generate import GenerationParams, Prompting
from tunelab.inference.openai_requests import Sampling
from tunelab.inference.reasoning import THINK, Thinking

HELP = "/reset clears the conversation, /exit quits"


class ChatSession:
    """A conversation with one model: each answer is generated from the whole history and then joins it.

    The answer streams through the server's code path (inference/streaming.py): generation ends at the chat
    template's turn end as well as the model's EOS, an error in the generating thread comes back to the caller
    (never a reader left waiting), and the oldest exchanges are left out when the history outgrows the context.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        options: GenerationParams | None = None,
        system: str | None = None,
        thinking: Thinking | None = THINK,
        template_kwargs: dict[str, Any] | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.options = options or GenerationParams(max_new_tokens=256)
        self.system = system
        self.thinking = thinking  # how the model writes its reasoning (reasoning.py); None: its answers are all answer
        # more variables for the template (Qwen3's enable_thinking), checked as training's chat_template_kwargs, and
        # a system message the template cannot take (Gemma 2's) said now, not at the first message
        kwargs = template_variables(template_kwargs) or {}
        self.template_kwargs = (
            Prompting(system if self.templated else None, kwargs).check(tokenizer, "chat").template_kwargs
        )
        self.history: list[dict[str, str]] = []
        self.opened = ""  # the open marker, when the last prompt's template opened the think block
        self.finish_reason = "stop"  # of the last answer: "length" when it reached its token budget
        self.context_full = False  # the last answer's budget was what the context had left, below max_new_tokens
        self._lock = threading.Lock()

    @property
    def templated(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def reset(self) -> None:
        self.history = []

    def prompt_text(self, history: list[dict[str, str]] | None = None) -> str:
        history = self.history if history is None else history
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + history
        if self.templated:
            messages = with_reasoning([messages], template_text(self.tokenizer))[0]  # earlier reasoning, as trained
            render = {"tokenize": False, "add_generation_prompt": True, **self.template_kwargs}
            return self.tokenizer.apply_chat_template(messages, **render)
        # A model trained on plain text has no turns: give it the conversation as text and let it continue.
        return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"

    def send(self, text: str, on_token: Callable[[str], None] = lambda piece: None) -> str:
        """Add the user's turn, stream the model's answer piece by piece to `on_token`, and return it whole, as
        written (reasoning included; `parts` reads it apart). The conversation keeps the reasoning apart from the
        answer. If generating fails, the conversation is left as it was and the error raised."""
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
            keep = self.thinking.markers if self.thinking else ()  # <think> may be a special token: kept, read
            generation = Generation(self.model, self.tokenizer, self._lock, ids, sampling, keep)
            for piece in generation:
                pieces.append(piece)
                on_token(piece)
        except BaseException:
            self.history.pop()
            raise
        self.finish_reason = generation.finish_reason
        answer = "".join(pieces).strip()
        reasoning, content = self.parts(answer)
        turn = {"role": "assistant", "content": content or ""}
        self.history.append(turn | ({"reasoning_content": reasoning} if reasoning else {}))
        return answer

    def parts(self, answer: str, whole: bool = True) -> tuple[str | None, str | None]:
        """(reasoning, answer) of an answer as written (Thinking.read), or of the answer so far (`whole` False:
        Thinking.parts), after the open marker when the template opened the block. Whole, the answer is None only
        when the model stopped inside its reasoning (then without the start of a close marker it had begun)."""
        if self.thinking is None:
            return None, answer
        text = self.opened + answer
        if whole:
            return self.thinking.read(text, cut=self.finish_reason == "length")
        return self.thinking.parts(text, whole=False)

    def _prompt_ids(self) -> tuple[Any, int]:
        """The prompt's token ids and how many tokens the answer may take: the oldest exchanges are left out
        until the prompt and the answer fit the model's context (the whole history stays in self.history)."""
        context = getattr(self.model.config, "max_position_embeddings", None)
        wanted = self.options.max_new_tokens
        history = self.history
        self.context_full = False
        while True:
            text = self.prompt_text(history)
            self.opened = self.thinking.opened_by(text) if self.thinking and self.templated else ""
            ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=not self.templated)["input_ids"]
            length = int(ids.shape[1])
            if context is None or length + wanted <= context:
                return ids.to(self.model.device), wanted
            if len(history) > 1:
                history = history[2:] if history[0]["role"] == "user" and len(history) > 2 else history[1:]
                continue
            if length < context:  # the message alone fits: a shorter answer
                self.context_full = True
                return ids.to(self.model.device), context - length
            raise TunelabError(f"chat: the message is {length} tokens; this model's context is {context} tokens")


def chat_loop(
    session: ChatSession,
    read: Callable[[str], str] = input,
    out: TextIO = sys.stdout,
    name: str = "model",
    show_reasoning: bool = True,
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
        shown = StreamedAnswer(session, out, show_reasoning)
        try:
            shown.end(session.send(line, shown.add))
        except TunelabError as err:  # a message longer than the context: say so, and keep the conversation
            print(f"({err})", end="", file=out, flush=True)
        print(file=out, flush=True)


class StreamedAnswer:
    """One answer on the terminal as it streams: its reasoning after `thinking> ` (dimmed on a terminal, or only
    said with show_reasoning False), then its answer after `assistant> `. What could still be a marker is held
    back until the next piece says (Thinking.parts), so `<think>` itself is never printed."""

    def __init__(self, session: ChatSession, out: TextIO, show_reasoning: bool):
        self.session, self.out, self.show_reasoning = session, out, show_reasoning
        self.dim = out.isatty() and not os.environ.get("NO_COLOR")  # no-color.org: set and not empty
        self.text = ""  # the answer so far, as written
        self.reasoning_shown = 0  # characters of the reasoning printed
        self.answering = False  # `assistant> ` printed
        self.answer_shown = 0  # characters of the answer printed

    def add(self, piece: str) -> None:
        self.text += piece
        self._show(*self.session.parts(self.text, whole=False))

    def end(self, answer: str) -> None:
        reasoning, content = self.session.parts(answer)
        self._show(reasoning, content)
        if content is None:  # it stopped inside its reasoning
            self._print("\n" if self.reasoning_shown else "thinking> ")
            if self.session.finish_reason == "length" and self.session.context_full:
                self._print("(the answer was cut off while thinking: the message leaves it little of the context)")
            elif self.session.finish_reason == "length":
                self._print("(the answer was cut off while thinking: raise --max-new-tokens)")
            else:
                self._print("(the model stopped while thinking, without an answer)")

    def _show(self, reasoning: str | None, content: str | None) -> None:
        if reasoning and len(reasoning) > self.reasoning_shown and not self.answering:
            if not self.reasoning_shown:
                self._print("thinking> " + ("" if self.show_reasoning else "..."))
            if self.show_reasoning:
                new = reasoning[self.reasoning_shown :]
                self._print(f"\x1b[2m{new}\x1b[0m" if self.dim else new)
            self.reasoning_shown = len(reasoning)
        if content is None:
            return
        if not self.answering:
            self._print(("\n" if self.reasoning_shown else "") + "assistant> ")
            self.answering = True
        text = content if self.reasoning_shown else content.lstrip()
        if len(text) > self.answer_shown:
            self._print(text[self.answer_shown :])
            self.answer_shown = len(text)

    def _print(self, text: str) -> None:
        print(text, end="", file=self.out, flush=True)
