"""What an OpenAI-style request may ask of `tunelab serve`, checked field by field.

Every check raises RequestError naming the field (`param`), which serve.py turns into an OpenAI-shaped 400 error,
so a client learns what to fix instead of getting a silently different answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tunelab.data.formats import without_nulls

ROLES = {"system", "user", "assistant", "tool"}
# Request fields that change what OpenAI would return and that this server cannot honour: refused with a 400
# rather than silently ignored, so a client never mistakes a plain answer for a JSON-mode answer. (`tools` are
# handed to the chat template: parse_tools.)
UNSUPPORTED = ("functions", "function_call", "logprobs", "top_logprobs", "response_format", "echo", "suffix")
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


def parse_sampling(body: dict) -> Sampling:
    """Check the options shared by both endpoints; anything unusable raises RequestError naming the field."""
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
        max_tokens=_optional_int(body, name, 1),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),  # 0 keeps only the likeliest token (transformers keeps one)
        stop=stop,
        seed=_optional_int(body, "seed", 0),
        max_tokens_field=name,
    )


def _content_text(content: Any, where: str) -> str:
    """A message's text: a string, or a list of text parts (what the openai client sends for rich content)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise RequestError(f"{where} must be a string or a list of text parts (images and audio are not supported)", where)


def parse_tools(body: dict) -> list[dict[str, Any]] | None:
    """The request's tool definitions for the chat template (None: none, or tool_choice "none"). tool_choice may
    be "auto" or "none": a model is not made to call a tool here, it calls one or answers."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise RequestError('tool_choice must be "auto" or "none" here (no call can be forced)', "tool_choice")
    if tools in (None, []) or choice == "none":
        return None
    if not isinstance(tools, list):
        raise RequestError("tools must be a list of function definitions", "tools")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise RequestError(f'tools[{i}] must be {{"type": "function", "function": {{...}}}}', f"tools[{i}]")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise RequestError(f"tools[{i}].function.name must be a non-empty string", f"tools[{i}].function.name")
    return [without_nulls(tool) for tool in tools]  # as training handed them to the template (data/formats.py)


def _calls(message: dict, where: str) -> list[dict[str, Any]]:
    """An assistant message's tool_calls as chat templates read them: the arguments an object, not OpenAI's JSON
    string (the templates write them with tojson, as in training: data/formats.py)."""
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        raise RequestError(f"{where}.tool_calls must be a list", f"{where}.tool_calls")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RequestError(f"{where}.tool_calls[{j}] must hold a function with a name", f"{where}.tool_calls")
        arguments = function.get("arguments") or "{}"
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except json.JSONDecodeError:
            arguments = None
        if not isinstance(arguments, dict):
            raise RequestError(
                f"{where}.tool_calls[{j}].function.arguments must be a JSON object", f"{where}.tool_calls"
            )
        shaped = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
        out.append(shaped | ({"id": call["id"]} if isinstance(call.get("id"), str) else {}))
    return out


def parse_messages(body: dict) -> list[dict[str, Any]]:
    """The chat as role/content dicts for the chat template (an assistant's tool calls and a tool's answer as
    training had them); a missing or malformed chat raises RequestError."""
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
        turn: dict[str, Any] = {"role": role, "content": _content_text(message.get("content"), f"{where}.content")}
        if role == "assistant" and message.get("tool_calls"):
            turn["tool_calls"] = _calls(message, where)
        if role == "tool" and isinstance(message.get("tool_call_id"), str):
            turn["tool_call_id"] = message["tool_call_id"]
        chat.append(turn)
    return chat


def parse_prompt(body: dict) -> str:
    """The prompt of a /v1/completions request: one string (a list holding one string is accepted too)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise RequestError("prompt must be a string (one prompt per request)", "prompt")
    return prompt
