"""Tool calls in a served model's answer, read back into OpenAI's `tool_calls`.

A model fine-tuned on tool use with tunelab's ChatML (data/templates/chatml.jinja) answers a call as Qwen2.5 and the
Hermes models do: a JSON object `{"name": ..., "arguments": {...}}` inside `<tool_call></tool_call>`, after any text
of its own. `tunelab serve` hands a request's `tools` to the chat template and, when the answer holds such calls,
returns them as OpenAI does: `message.tool_calls` (arguments as a JSON string), the text before them as `content`,
finish_reason "tool_calls". An answer in another form stays text.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

OPEN = "<tool_call>"
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def read_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(the answer's text without its calls, None when nothing is left; its calls in OpenAI's form). No calls, or
    one that is not a JSON object with a name: ([the text as it is], [])."""
    calls = []
    for match in _CALL.finditer(text):
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError:
            return text, []
        name, arguments = (call.get("name"), call.get("arguments")) if isinstance(call, dict) else (None, None)
        arguments = {} if arguments is None else arguments  # null arguments are none, as training reads them
        if not isinstance(name, str) or not isinstance(arguments, dict | str):
            return text, []
        arguments = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        call_id = f"call_{uuid.uuid4().hex[:24]}"
        calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
    if not calls:
        return text, []
    return text_without_calls(text) or None, calls


def text_without_calls(text: str) -> str:
    """An answer's own text, its call blocks taken out."""
    return _CALL.sub("", text).strip()


def call_start(text: str) -> int:
    """Where the first call begins in a streamed answer so far, or how much of it can be sent as text: the
    text up to a `<tool_call>`, or up to what could be the start of one."""
    found = text.find(OPEN)
    if found >= 0:
        return found
    held = max((n for n in range(len(OPEN) - 1, 0, -1) if text.endswith(OPEN[:n])), default=0)
    return len(text) - held
