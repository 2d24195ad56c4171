"""Row shapes and column mapping: which columns hold what, and each row turned into text or messages.

Shapes (picked from the columns and the column mapping, in this order):
- `messages`: text_column holds a list of {role, content} (or ShareGPT {from, value}), or a JSON string of one;
- `prompt_completion`: prompt_text_column + text_column (the completion);
- `text`: text_column holds a string, used as it is (pre-formatted text such as `<s>[INST] ... [/INST] ...`);
- `alpaca`: no text_column, but instruction / input / output columns;
- also `messages` / `conversations` or `prompt` / `completion` columns when text_column is left at `text`.
Every row becomes {"text": str} or {"messages": [...]}; prompt/completion and Alpaca rows become a user and an
assistant message so that one renderer (data/templates.py) formats and masks everything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tunelab.data.sources import Split
from tunelab.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
MAX_LISTED = 5


@dataclass
class RowFormat:
    """The shape of the rows and the columns it reads."""

    kind: str  # text | messages | prompt_completion | alpaca
    columns: dict[str, str]

    def describe(self) -> str:
        cols = ", ".join(f"{role}={col!r}" for role, col in self.columns.items())
        return f"{self.kind} ({cols})"


def detect_format(split: Split, text_column: str, prompt_text_column: str | None = None) -> RowFormat:
    """Decide the row shape from the columns; a missing column raises DataError naming it and the file."""
    columns = split.columns
    listed = ", ".join(columns[:20])
    if prompt_text_column:
        missing = [c for c in (prompt_text_column, text_column) if c not in columns]
        if missing:
            raise DataError(f"{split.origin}: column {missing[0]!r} not found (columns: {listed})")
        return RowFormat("prompt_completion", {"prompt": prompt_text_column, "completion": text_column})
    if text_column in columns:
        sample = next((row[text_column] for row in split.rows if row.get(text_column) not in (None, "")), "")
        kind = "messages" if is_messages(sample) else "text"
        return RowFormat(kind, {kind: text_column})
    if text_column == "text":  # the default name: look for the other common shapes
        if "instruction" in columns and "output" in columns:
            cols = {"instruction": "instruction", "output": "output"}
            if "input" in columns:
                cols["input"] = "input"
            return RowFormat("alpaca", cols)
        for name in ("messages", "conversations", "conversation"):
            if name in columns:
                return RowFormat("messages", {"messages": name})
        if "prompt" in columns and "completion" in columns:
            return RowFormat("prompt_completion", {"prompt": "prompt", "completion": "completion"})
    raise DataError(
        f"{split.origin}: text column {text_column!r} not found (columns: {listed}); "
        "set --text-column (or data.column_mapping.text_column) to the column that holds the text"
    )


def is_messages(value: Any) -> bool:
    if isinstance(value, str):
        value = value.strip()
        if not (value.startswith("[") and value.endswith("]")):
            return False
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return False
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value)


def to_examples(split: Split, fmt: RowFormat) -> list[dict[str, Any]]:
    """Every row as {"text": ...} or {"messages": [...]}; all bad rows are collected into one DataError."""
    examples, problems = [], []
    for index, row in enumerate(split.rows):
        try:
            examples.append(_convert(row, fmt))
        except RowProblem as problem:
            problems.append(f"{split.where(index)}, column {problem.column!r}: {problem.reason}")
    raise_bad_rows(problems, split.origin)
    return examples


def raise_bad_rows(problems: list[str], origin: str) -> None:
    """One DataError listing the first bad rows of a file and how many more there are (nothing if none)."""
    if problems:
        shown = "; ".join(problems[:MAX_LISTED])
        more = f" (and {len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
        raise DataError(f"{len(problems)} bad row(s) in {origin}: {shown}{more}")


class RowProblem(Exception):
    """One bad cell: the column and what is wrong with it (collected, then reported together)."""

    def __init__(self, column: str, reason: str) -> None:
        super().__init__(reason)
        self.column, self.reason = column, reason


def cell_text(row: dict, column: str, allow_empty: bool = False) -> str:
    value = row.get(column)
    if value is None:
        raise RowProblem(column, "missing value")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise RowProblem(column, f"expected text, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RowProblem(column, "empty text")
    return value


def _convert(row: dict, fmt: RowFormat) -> dict[str, Any]:
    cols = fmt.columns
    if fmt.kind == "text":
        return {"text": cell_text(row, cols["text"])}
    if fmt.kind == "prompt_completion":
        prompt, completion = cell_text(row, cols["prompt"]), cell_text(row, cols["completion"])
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]}
    if fmt.kind == "alpaca":
        user = {"role": "user", "content": cell_text(row, cols["instruction"])}
        if "input" in cols:
            context = cell_text(row, cols["input"], allow_empty=True)
            if context.strip():
                user["input"] = context
        return {"messages": [user, {"role": "assistant", "content": cell_text(row, cols["output"])}]}
    return {"messages": cell_messages(row, cols["messages"])}


def cell_messages(row: dict, column: str, need_assistant: bool = True) -> list[dict[str, str]]:
    value = row.get(column)
    if value is None:
        raise RowProblem(column, "missing value")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise RowProblem(column, f"not a JSON list of messages ({err.msg})") from None
    if not isinstance(value, list) or not value:
        raise RowProblem(column, "expected a non-empty list of {role, content} messages")
    messages = []
    for number, item in enumerate(value, start=1):
        if not isinstance(item, dict):
            raise RowProblem(column, f"message {number} is not an object")
        if "from" in item and "value" in item:  # ShareGPT
            role, content = SHAREGPT_ROLES.get(str(item["from"]).lower(), item["from"]), item["value"]
        else:
            role, content = item.get("role"), item.get("content")
        if role not in ROLES:
            raise RowProblem(column, f"message {number} has unknown role {role!r} (use {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise RowProblem(column, f"message {number} content is not text")
        messages.append({"role": role, "content": content})
    if need_assistant and not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise RowProblem(column, "no assistant message to learn from")
    return messages
