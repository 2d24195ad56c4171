"""Tool calls in a served model's answer, read back into OpenAI's `tool_calls`.

A model writes its calls in the form its chat template taught it, and `tunelab serve` reads the same forms as
vLLM's tool parsers of those names:

- `hermes`: a JSON object `{"name": ..., "arguments": {...}}` inside `<tool_call></tool_call>`, after any text of
  the model's own (Qwen2.5, Qwen3, the Hermes models, and tunelab's ChatML: data/templates/chatml.jinja).
- `mistral`: `[TOOL_CALLS]` and then a JSON list of `{"name", "arguments"}` objects, or (Mistral's newer
  templates) `[TOOL_CALLS]name[ARGS]{...}` for each call.
- `llama3_json`: the whole answer a JSON object `{"name": ..., "parameters": {...}}` (several joined by `;`),
  after `<|python_tag|>` or not (Llama 3.1 to 3.3).

The form is read from the chat template (`form_for`) or named (`tunelab serve --tool-call-parser`). The answer's
calls come back as OpenAI returns them: `message.tool_calls` (arguments as a JSON string), the model's own text as
`content`, finish_reason "tool_calls". An answer that is not whole calls in its form stays text.

A request's tool_choice "required" (or a tool named) is honoured as the chat template writes a call
(`forced_start`): the answer is begun with the call's opening, up to the name (or, named, up to its arguments),
and the model writes the rest.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tunelab.data.templates import template_text

# a call closed, or the last one left open (the model stopped at its end token before writing the close)
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|\Z)", re.DOTALL)
_MISTRAL_NAMED = re.compile(r"([^\s\[\]{}]+)\s*(?:\[CALL_ID\]\s*\w+\s*)?\[ARGS\](.*)", re.DOTALL)
_ID_CHARACTERS = string.ascii_letters + string.digits


@dataclass(frozen=True)
class ToolCallForm:
    """How one family of models writes tool calls in an answer."""

    name: str
    opener: str  # what begins the calls (where a streamed answer's text is held back from)
    markers: tuple[str, ...]  # its tokens, kept when the answer is decoded (some tokenizers mark them special)
    find: Callable[[str], list[tuple[Any, Any]] | None]  # each call's (name, arguments); None: malformed
    own_text: Callable[[str], str]  # the answer's text, its calls taken out
    whole_answer: bool = False  # the calls are the whole answer (nothing else is written before them)
    short_ids: bool = False  # call ids of 9 letters or digits: Mistral's templates refuse others in later turns

    def read(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """(the answer's text without its calls, None when nothing is left; its calls in OpenAI's form). An answer
        without calls, or with one that is not a JSON object with a name: ([the text as it is], [])."""
        found = self.find(text)
        if not found:
            return text, []
        calls = []
        for name, arguments in found:
            arguments = {} if arguments is None else arguments  # null arguments are none, as training reads them
            if isinstance(arguments, str):  # a JSON string of the object, as OpenAI's own are
                arguments = _json(arguments) if arguments.strip() else {}
            if not isinstance(name, str) or not name or not isinstance(arguments, dict):
                return text, []
            function = {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}
            calls.append({"id": self._call_id(), "type": "function", "function": function})
        return self.own_text(text) or None, calls

    def call_start(self, text: str) -> int:
        """How much of a streamed answer so far can be sent as text: the text up to where the calls begin, or up to
        what could be their start."""
        if self.whole_answer:  # it is held until its first character says whether it is a call
            lead = text.lstrip()
            could_open = lead.startswith(("{", self.opener)) or self.opener.startswith(lead)
            return 0 if could_open else len(text)
        found = text.find(self.opener)
        if found >= 0:
            return found
        held = max((n for n in range(len(self.opener) - 1, 0, -1) if text.endswith(self.opener[:n])), default=0)
        return len(text) - held

    def _call_id(self) -> str:
        if self.short_ids:
            return "".join(secrets.choice(_ID_CHARACTERS) for _ in range(9))
        return f"call_{secrets.token_hex(12)}"


def _hermes(text: str) -> list[tuple[Any, Any]] | None:
    found = []
    for match in _HERMES_CALL.finditer(text):
        call = _json(match.group(1))
        if not isinstance(call, dict):
            return None
        found.append((call.get("name"), call.get("arguments")))
    return found


def _mistral(text: str) -> list[tuple[Any, Any]] | None:
    _, opened, rest = text.partition("[TOOL_CALLS]")
    if not opened:
        return []
    found = []
    for part in (p.strip() for p in rest.split("[TOOL_CALLS]")):
        if part.startswith(("[", "{")):  # the JSON form: a list of calls (or one)
            calls = _json(part)
            calls = [calls] if isinstance(calls, dict) else calls
            if not isinstance(calls, list) or not calls or not all(isinstance(c, dict) for c in calls):
                return None
            found += [(c.get("name"), c.get("arguments")) for c in calls]
            continue
        named = _MISTRAL_NAMED.fullmatch(part)
        arguments = _json(named.group(2)) if named else None
        if not isinstance(arguments, dict):
            return None
        found.append((named.group(1), arguments))
    return found


def _llama3_json(text: str) -> list[tuple[Any, Any]] | None:
    text = text.strip().removeprefix("<|python_tag|>").strip()
    if not text.startswith("{"):
        return []
    found, at, decoder = [], 0, json.JSONDecoder()
    while at < len(text):
        try:
            call, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            return None
        if not isinstance(call, dict) or not ({"parameters", "arguments"} & call.keys()):
            return None  # JSON that is not a call (a name and its parameters): the answer is text
        found.append((call.get("name"), call["parameters"] if "parameters" in call else call["arguments"]))
        at = len(text) - len(text[at:].lstrip().removeprefix(";").lstrip())
    return found


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


HERMES = ToolCallForm(
    "hermes", "<tool_call>", ("<tool_call>", "</tool_call>"), _hermes, lambda text: _HERMES_CALL.sub("", text).strip()
)
MISTRAL = ToolCallForm(
    "mistral", "[TOOL_CALLS]", ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"), _mistral,
    lambda text: text.split("[TOOL_CALLS]", 1)[0].strip(), short_ids=True,
)  # fmt: skip
LLAMA3_JSON = ToolCallForm("llama3_json", "<|python_tag|>", ("<|python_tag|>",), _llama3_json, lambda text: "", True)
_BY_NAME = {form.name: form for form in (HERMES, MISTRAL, LLAMA3_JSON)}
FORMS = tuple(_BY_NAME)


def form_for(tokenizer: Any, name: str = "auto") -> ToolCallForm:
    """The form named (one of FORMS), or with "auto" the one the tokenizer's chat template writes calls in
    (Hermes, tunelab's own, when it shows none of the others)."""
    if name != "auto":
        return _BY_NAME[name]
    template = template_text(tokenizer, tools=True)
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    if "<tool_call>" not in template and ("<|python_tag|>" in template or '"parameters": ' in template):
        return LLAMA3_JSON
    return HERMES


_NAME = "tunelab_forced_call"  # a stand-in call, rendered to see where the template puts a call's name and arguments
_ARGUMENT = "tunelab_forced_argument"


def forced_start(
    tokenizer: Any,
    messages: list[dict],
    tools: list[dict],
    prompt: str,
    name: str,
    options: dict[str, Any] | None = None,
) -> str | None:
    """The start of an answer that calls a tool, as the chat template writes a call after `prompt` (the messages
    rendered with the generation prompt and `options`, the request's chat_template_kwargs): up to where the call's
    name goes (`name` ""), or with `name` written, up to where its arguments go. None when the template writes no
    call there."""
    call = {"id": "a1b2c3d4e", "type": "function", "function": {"name": _NAME, "arguments": {_ARGUMENT: 0}}}
    turn = {"role": "assistant", "content": "", "tool_calls": [call]}
    try:
        text = tokenizer.apply_chat_template([*messages, turn], tools=tools, tokenize=False, **(options or {}))
    except Exception:  # a template that refuses an answer after these messages
        return None
    tail = text[len(prompt) :] if text.startswith(prompt) else ""
    at = tail.find(_NAME)
    if at < 0:
        return None
    if not name:
        return tail[:at]
    arguments = tail.rfind("{", at, tail.find(f'"{_ARGUMENT}"', at))
    # up to the arguments, less a space before them: BPE vocabularies write it with the brace, as training saw it
    return (tail[:at] + name + tail[at + len(_NAME) : arguments]).rstrip(" ") if arguments > at else None
