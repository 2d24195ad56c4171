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

_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def read_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(the answer's text before its calls, None when there is none; its calls in OpenAI's form). No calls, or one
    that is not a JSON object with a name: ([the text as it is], [])."""
    found = list(_CALL.finditer(text))
    calls = []
    for match in found:
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError:
            return text, []
        name, arguments = (call.get("name"), call.get("arguments", {})) if isinstance(call, dict) else (None, None)
        if not isinstance(name, str) or not isinstance(arguments, dict | str):
            return text, []
        arguments = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        call_id = f"call_{uuid.uuid4().hex[:24]}"
        calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
    if not calls:
        return text, []
    content = text[: found[0].start()].strip()
    return content or None, calls
