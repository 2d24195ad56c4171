"""What an OpenAI-style request may ask of `tunelab serve`, checked field by field.

Every check raises RequestError naming the field (`param`), which serve.py turns into an OpenAI-shaped 400 error,
so a client learns what to fix instead of getting a silently different answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tunelab.config.llm import RENDER_NAMES
from tunelab.data.formats import REASONING_KEYS, tool_call, without_nulls

ROLES = {"system", "user", "assistant", "tool"}
# Request fields that change what OpenAI would return and that this server cannot honour: refused with a 400
# rather than silently ignored, so a client never mistakes a plain answer for a JSON-mode answer. (`tools` are
# handed to the chat template: parse_tools.)
UNSUPPORTED = ("functions", "function_call", "response_format", "suffix")
# Fields that change the answer only away from their default (OpenAI's penalties have no exact counterpart in
# transformers' generate): the default is accepted, any other value refused.
DEFAULT_ONLY = {"best_of": 1, "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}}
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context


class RequestError(Exception):
    """A request this server cannot answer as asked; becomes an OpenAI-style 400 error."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


@dataclass
class Sampling:
    """The decoding options of one request, as OpenAI names them (temperature 0 means greedy)."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # OpenAI has none: 0 switches transformers' default top_k=50 off (tunelab chat sets its own)
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    max_tokens_field: str = "max_tokens"  # the name the request used (max_completion_tokens, for newer clients)


# ---- reading requests ------------------------------------------------------------------------------------------


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise RequestError(f"{name} must be a number from {low} to {high}, got {value!r}", name)
    return float(value)


def _optional_int(body: dict, name: str, low: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise RequestError(f"{name} must be an integer of at least {low}, got {value!r}", name)
    return value


def parse_sampling(body: dict, scoring_only: bool = False) -> Sampling:
    """Check the options shared by both endpoints; anything unusable raises RequestError naming the field.
    scoring_only: max_tokens may be 0 (a text completion that echoes its prompt, to score it)."""
    if body.get("n") not in (None, 1):
        raise RequestError(f"n must be 1: this server returns one choice per request, got {body['n']!r}", "n")
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False, [], {"type": "text"}):
            raise RequestError(f"{name} is not supported by tunelab serve", name)
    for name, default in DEFAULT_ONLY.items():
        if body.get(name) not in (None, default):
            raise RequestError(f"{name} is not supported by tunelab serve (only {default!r})", name)
    if not isinstance(body.get("stream", False), bool):
        raise RequestError("stream must be true or false", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise RequestError('stream_options must be an object such as {"include_usage": true}', "stream_options")
    if options is not None and not body.get("stream"):
        raise RequestError("stream_options is only allowed when stream is true", "stream_options")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("stop must be a string or a list of up to 4 non-empty strings", "stop")
    # Newer clients send max_completion_tokens for chat (max_tokens is deprecated there); either is accepted.
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return Sampling(
        max_tokens=_optional_int(body, name, 0 if scoring_only else 1),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),  # 0 keeps only the likeliest token (transformers keeps one)
        stop=stop,
        seed=_optional_int(body, "seed", 0),
        max_tokens_field=name,
    )


def _content(content: Any, where: str, role: str, images: bool) -> str | list[dict[str, Any]]:
    """A message's content: its text, or (a vision-language model's user turn) its text and image parts, each image
    a `data:` URI as the openai client sends a local image (URLs and server files are not fetched), decoded."""
    if not images or not isinstance(content, list) or all(_is_text(p) for p in content):
        return _content_text(content, where)
    from tunelab.data.images import ImageProblem, checked_ref, image_ref

    parts: list[dict[str, Any]] = []
    for number, part in enumerate(content):
        if _is_text(part):
            parts.append({"type": "text", "text": str(part.get("text", ""))})
            continue
        at = f"{where}[{number}]"
        if not isinstance(part, dict) or part.get("type") not in ("image_url", "input_image", "image"):
            raise RequestError(f"{at} must be a text or image_url part (audio and files are not supported)", at)
        if role not in ("user", "system"):
            raise RequestError(f"{at}: only user and system turns show images", at)
        url = image_ref(part)
        if not isinstance(url, str) or not url.startswith("data:"):
            raise RequestError(
                f"{at}: an image must be a data: URI (base64), as the openai client sends a local image; URLs and "
                "files are not fetched",
                at,
            )
        try:
            parts.append({"type": "image", "image": checked_ref(url, None)})
        except ImageProblem as err:
            raise RequestError(f"{at}: {err}", at) from None
    return parts


def _is_text(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "text"


def _content_text(content: Any, where: str) -> str:
    """A message's text: a string, or a list of text parts (what the openai client sends for rich content)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise RequestError(f"{where} must be a string or a list of text parts (images and audio are not supported)", where)


@dataclass
class ToolRequest:
    """What a chat request asks of tools: the definitions for the chat template (None: none, or tool_choice
    "none"), the call it forces (None: the model calls one or answers; "": it must call one; a name: that one), and
    whether several calls may come back."""

    tools: list[dict[str, Any]] | None = None
    forced: str | None = None
    parallel: bool = True


def parse_tools(body: dict) -> ToolRequest:
    """The request's tools, tool_choice ("auto", "none", "required", or {"type": "function", "function": {"name":
    ...}}) and parallel_tool_calls."""
    tools, choice, parallel = body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls")
    parallel = True if parallel is None else parallel
    if not isinstance(parallel, bool):
        raise RequestError("parallel_tool_calls must be true or false", "parallel_tool_calls")
    forced = _forced(choice)
    if tools in (None, []) or choice == "none":
        if forced is not None:
            raise RequestError("tool_choice asks for a tool call, but the request gives no tools", "tool_choice")
        return ToolRequest()
    if not isinstance(tools, list):
        raise RequestError("tools must be a list of function definitions", "tools")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise RequestError(f'tools[{i}] must be {{"type": "function", "function": {{...}}}}', f"tools[{i}]")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise RequestError(f"tools[{i}].function.name must be a non-empty string", f"tools[{i}].function.name")
    if forced and forced not in {tool["function"]["name"] for tool in tools}:
        raise RequestError(f"tool_choice names {forced!r}, which is not one of the request's tools", "tool_choice")
    # as training handed them to the template (data/formats.py)
    return ToolRequest([without_nulls(tool) for tool in tools], forced, parallel)


def _forced(choice: Any) -> str | None:
    if choice in (None, "auto", "none"):
        return None
    if choice == "required":
        return ""
    function = choice.get("function") if isinstance(choice, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise RequestError(
            'tool_choice must be "auto", "none", "required" or {"type": "function", "function": {"name": ...}}',
            "tool_choice",
        )
    return function["name"]


def _calls(message: dict, where: str) -> list[dict[str, Any]]:
    """An assistant message's tool_calls as chat templates read them, read as training data's are
    (formats.tool_call: the arguments an object, not OpenAI's JSON string)."""
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        raise RequestError(f"{where}.tool_calls must be a list", f"{where}.tool_calls")
    out = []
    for j, call in enumerate(calls):
        try:
            out.append(tool_call(call))
        except ValueError as err:
            raise RequestError(f"{where}.tool_calls[{j}] is {err}", f"{where}.tool_calls") from None
    return out


def parse_messages(body: dict, images: bool = False) -> list[dict[str, Any]]:
    """The chat as role/content dicts for the chat template (an assistant's tool calls and a tool's answer as
    training had them; with `images`, a vision-language model's, user turns' image parts); a missing or malformed
    chat raises RequestError."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects", "messages")
    chat = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object with role and content", where)
        # OpenAI's newer "developer" role plays the part of "system"; chat templates only know "system".
        role = "system" if message.get("role") == "developer" else message.get("role")
        if role not in ROLES:
            raise RequestError(
                f"{where}.role must be one of {', '.join(sorted(ROLES))}, got {message.get('role')!r}", f"{where}.role"
            )
        content = _content(message.get("content"), f"{where}.content", role, images)
        turn: dict[str, Any] = {"role": role, "content": content}
        if role == "assistant" and message.get("tool_calls"):
            turn["tool_calls"] = _calls(message, where)
        reasoning = next((message[key] for key in REASONING_KEYS if message.get(key)), None)
        if role == "assistant" and isinstance(reasoning, str) and reasoning.strip():
            turn["reasoning_content"] = reasoning  # an earlier answer's, sent back: where training had it
        if role == "tool" and isinstance(message.get("tool_call_id"), str):
            turn["tool_call_id"] = message["tool_call_id"]
        chat.append(turn)
    return chat


def parse_template_kwargs(body: dict) -> dict[str, Any]:
    """A chat request's `chat_template_kwargs` (vLLM's): more variables for the chat template, such as Qwen3's
    `enable_thinking: false`; {} when the request has none."""
    value = body.get("chat_template_kwargs")
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(key, str) and key.isidentifier() for key in value):
        raise RequestError("chat_template_kwargs must be an object of template variables", "chat_template_kwargs")
    taken = sorted(RENDER_NAMES & value.keys())
    if taken:
        raise RequestError(
            f"chat_template_kwargs may not set {', '.join(taken)} (the request or the renderer sets those)",
            "chat_template_kwargs",
        )
    return value


def parse_prompt(body: dict) -> str | list[int]:
    """The prompt of a /v1/completions request: one string, or one list of token ids (as lm-evaluation-harness
    sends them); a list holding one of these is accepted too."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    if not isinstance(prompt, str):
        raise RequestError("prompt must be a string or a list of token ids (one prompt per request)", "prompt")
    return prompt


def parse_logprobs(body: dict, chat: bool) -> int | None:
    """How many of the likeliest tokens to return at each place with the answer's log-probs, or None when the
    request asks for none. Chat: `logprobs` true and `top_logprobs` (0 to 20); text completions: `logprobs` (0 to
    5). They are worked out once the answer is whole (inference/logprobs.py): streamed, they come in one chunk
    after the answer's text."""
    from tunelab.inference.logprobs import CHAT_TOP_MAX, COMPLETIONS_TOP_MAX

    wanted, top = body.get("logprobs"), body.get("top_logprobs")
    if chat:
        if wanted not in (None, True, False):
            raise RequestError("logprobs must be true or false", "logprobs")
        if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= CHAT_TOP_MAX):
            raise RequestError(f"top_logprobs must be an integer from 0 to {CHAT_TOP_MAX}", "top_logprobs")
        if top is not None and not wanted:
            raise RequestError("top_logprobs needs logprobs set to true", "top_logprobs")
        found = (top or 0) if wanted else None
    else:
        bad = isinstance(wanted, bool) or not isinstance(wanted, int) or not 0 <= wanted <= COMPLETIONS_TOP_MAX
        if wanted is not None and bad:
            raise RequestError(f"logprobs must be an integer from 0 to {COMPLETIONS_TOP_MAX}", "logprobs")
        found = wanted
    return found


def parse_echo(body: dict) -> bool:
    """A text completion's `echo`: the prompt returned before the answer (with its log-probs, when asked)."""
    echo = body.get("echo", False)
    if echo is None or echo is False:
        return False
    if echo is not True:
        raise RequestError("echo must be true or false", "echo")
    if body.get("stream"):
        raise RequestError("echo is not streamed by tunelab serve: ask for it without stream", "echo")
    return True
