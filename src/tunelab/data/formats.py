"""Row shapes and column mapping: which columns hold what, and each row turned into text or messages.

Shapes (picked from the columns and the column mapping, in this order):
- `messages`: text_column holds a list of {role, content} (or ShareGPT {from, value}), or a JSON string of one;
  content is text or a list of OpenAI-style text parts;
- `prompt_completion`: prompt_text_column + text_column (the completion);
- `text`: text_column holds a string, used as it is (pre-formatted text such as `<s>[INST] ... [/INST] ...`);
- `alpaca`: no text_column, but instruction / input / output columns (and LLaMA-Factory's `history`);
- `image_text`: image_column + text_column (an image and its caption: AutoTrain's vlm captioning), and
  prompt_completion with image_column (AutoTrain's vqa), the images shown in the user turn before the prompt;
- also `messages` / `conversations` or `prompt` / `completion` columns when text_column is left at `text`.
Every row becomes {"text": str} or {"messages": [...]}; prompt/completion and Alpaca rows become a user and an
assistant message so that one renderer (data/templates.py) formats and masks everything. LLaMA-Factory's datasets
read as it reads them: a `system` column beside Alpaca or message rows, ShareGPT's `function_call` and
`observation` turns as the assistant's tool calls and a tool's result.

A row that cannot be used raises RowProblem (its column and what is wrong); `convert_rows` collects them and,
as `bad_rows` says, stops with one DataError naming them ("error") or drops them with a warning ("skip").
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tunelab.data.images import IMAGE_COLUMNS, IMAGE_TAG, ImageProblem, checked_ref, image_parts, image_ref
from tunelab.data.sources import HEAD_ROWS, Split, json_or_none, read_file
from tunelab.data.templates import THINK_OPEN
from tunelab.errors import DataError

log = logging.getLogger("tunelab")
T = TypeVar("T")

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "observation": "tool",  # LLaMA-Factory's name for a tool's result
}
# LLaMA-Factory's ShareGPT gives the assistant's tool calls a turn of their own, its value the JSON of the call(s)
SHAREGPT_CALL = "function_call"
SYSTEM_COLUMN = "system"  # LLaMA-Factory's: a conversation's system prompt, in a column beside its turns
HISTORY_COLUMN = "history"  # LLaMA-Factory's Alpaca rows: the conversation's earlier [instruction, answer] pairs
MAX_LISTED = 5
TOOL_CALL_KEYS = ("tool_calls", "function_call")  # OpenAI's chat format, and its older single-call spelling
TOOLS_TRAINED_BY = (
    "tool calls are trained by the sft and default methods only (leave out the conversations that call tools)"
)
TOOLS_COLUMN = "tools"  # a conversation's tool definitions, beside its messages (TRL's and OpenAI's name)
# An assistant turn's reasoning before its answer: DeepSeek's API and Qwen3's template call it reasoning_content,
# OpenRouter and vLLM reasoning, gpt-oss's template thinking. Kept as reasoning_content (data/templates.py writes it).
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
# Content part types that hold no text (OpenAI's chat and responses APIs, transformers' multimodal chats).
MEDIA_PARTS = {
    "image": "image",
    "image_url": "image",
    "input_image": "image",
    "audio": "audio",
    "input_audio": "audio",
    "video": "video",
    "video_url": "video",
    "file": "file",
    "input_file": "file",
}


@dataclass
class RowFormat:
    """The shape of the rows and the columns it reads."""

    kind: str  # text | messages | prompt_completion | alpaca | image_text
    columns: dict[str, str]
    images: bool = False  # the model reads images: a chat row's `images` column is its images (with_row_images)

    def describe(self) -> str:
        cols = ", ".join(f"{role}={col!r}" for role, col in self.columns.items())
        return f"{self.kind} ({cols})"


def detect_format(
    split: Split, text_column: str, prompt_text_column: str | None = None, image_column: str | None = None
) -> RowFormat:
    """Decide the row shape from the columns; a missing column raises DataError naming it and the file."""
    columns = split.columns
    listed = ", ".join(columns[:20])
    if image_column:
        missing = [c for c in (image_column, prompt_text_column, text_column) if c and c not in columns]
        if missing:
            raise DataError(f"{split.origin}: column {missing[0]!r} not found (columns: {listed})")
        if not prompt_text_column:
            return RowFormat("image_text", {"image": image_column, "text": text_column})
    if prompt_text_column:
        missing = [c for c in (prompt_text_column, text_column) if c not in columns]
        if missing:
            raise DataError(f"{split.origin}: column {missing[0]!r} not found (columns: {listed})")
        images = {"image": image_column} if image_column else {}
        return RowFormat("prompt_completion", {"prompt": prompt_text_column, "completion": text_column, **images})
    other = _common_shape(columns) if text_column == "text" else None
    if text_column in columns and not (other and _mostly_missing(split, text_column)):
        sample = next((row[text_column] for row in split.rows if row.get(text_column) not in (None, "")), "")
        kind = "messages" if is_messages(sample) else "text"
        shape = _common_shape(columns)
        if kind == "text" and shape and text_column in shape.columns.values():
            # A text_column the user set is obeyed, but `text_column: output` on an Alpaca file trains on the
            # answers alone, without their instructions: most likely not what was meant, so say so.
            log.warning(
                "%s: text_column %r is trained on as plain text, alone; the file has %s columns (%s): leave "
                "text_column unset to train on them as %s rows",
                split.origin,
                text_column,
                shape.kind,
                ", ".join(shape.columns.values()),
                shape.kind,
            )
        return RowFormat(kind, {kind: text_column})
    if other:
        return other
    raise DataError(
        f"{split.origin}: text column {text_column!r} not found (columns: {listed}); "
        "set --text-column (or data.column_mapping.text_column) to the column that holds the text"
    )


def _common_shape(columns: list[str]) -> RowFormat | None:
    """Alpaca, message-list or prompt/completion columns, looked for when text_column is left at its default."""
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
    return None


def _mostly_missing(split: Split, column: str) -> bool:
    """True when most rows have no value in `column`: a stray `text` key in a few rows of an Alpaca or chat file
    must not turn the whole file into plain text (the stray rows are then reported, or skipped, as bad rows)."""
    sample = split.rows[:1000]
    present = sum(1 for row in sample if row.get(column) not in (None, ""))
    return present * 2 < len(sample)


def holds_reasoning(split: Split, columns: list[str]) -> bool:
    """Whether the conversations in these columns give an answer reasoning (REASONING_KEYS, or a `<think>` block
    written at the start of its content): a run trained on them writes `<think>` blocks, which its Ollama export
    tells Ollama to read apart. The split's first HEAD_ROWS rows are looked at."""
    for row in split.rows[:HEAD_ROWS]:
        for column in columns:
            value = _listed_cell(row.get(column))
            if isinstance(value, list) and any(isinstance(m, dict) and _answer_reasons(m) for m in value):
                return True
    return False


def _answer_reasons(message: dict) -> bool:
    role, content = _role_and_content(message)
    reasoning = [message.get(key) for key in REASONING_KEYS]
    written = isinstance(content, str) and content.lstrip().startswith(THINK_OPEN)  # OpenThoughts' form
    return role == "assistant" and (written or any(isinstance(r, str) and r.strip() for r in reasoning))


def is_messages(value: Any) -> bool:
    """A message list, or a JSON string of one (a list of objects; their fields are checked row by row)."""
    value = _listed_cell(value)
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value)


def _listed_cell(value: Any) -> Any:
    """A cell as a list when it is a JSON string of one (CSV and Parquet keep message lists so), else as it is."""
    if isinstance(value, str):
        text = value.strip()
        return json_or_none(text) if text.startswith("[") and text.endswith("]") else value
    return value


# ------------------------------------------------------------------------------------------------ bad rows


class RowProblem(Exception):
    """One bad row: the column at fault (None when it is the row as a whole) and what is wrong with it."""

    def __init__(self, column: str | None, reason: str) -> None:
        super().__init__(reason)
        self.column, self.reason = column, reason


def convert_rows(split: Split, convert: Callable[[dict], T], bad_rows: str | None = "error") -> tuple[list[T], int]:
    """convert(row) for every row of a split; rows that raise RowProblem are bad rows.

    bad_rows="error": one DataError naming the first bad rows (file, line, column, reason) and how many more.
    bad_rows="skip": they are dropped and a warning names them the same way; a DataError if none is left.
    bad_rows=None: an error, for tasks that offer no choice (the message then does not suggest one).
    Returns the converted rows and how many were dropped.
    """
    kept, problems = [], []
    for index, row in enumerate(split.rows):
        try:
            kept.append(convert(row))
        except RowProblem as problem:
            problems.append(describe_problem(split, index, problem))
    settle_bad_rows(problems, split.origin, bad_rows, kept=len(kept))
    return kept, len(problems)


def describe_problem(split: Split, index: int, problem: RowProblem) -> str:
    """'train.jsonl line 12, column 'text': empty text': where the bad row is and what is wrong with it."""
    column = f", column {problem.column!r}" if problem.column is not None else ""
    return f"{split.where(index)}{column}: {problem.reason}"


def settle_bad_rows(
    problems: list[str], origin: str, bad_rows: str | None, kept: int, count: int | None = None
) -> None:
    """Raise (error) or log (skip) the bad rows of a file; `kept` is how many good rows it has, `count` how many
    bad ones when `problems` lists only the first of them."""
    if not problems:
        return
    count = len(problems) if count is None else count
    if bad_rows != "skip":
        hint = "" if bad_rows is None else "fix them, or set bad_rows: skip (--bad-rows skip) to leave them out"
        raise_bad_rows(problems, origin, hint, count)
    if not kept:
        raise DataError(f"every row of {origin} is bad, nothing is left to train on: {_listed(problems, count)}")
    log.warning("%s: skipped %d bad row(s) (bad_rows=skip): %s", origin, count, _listed(problems, count))


def raise_bad_rows(problems: list[str], origin: str, hint: str = "", count: int | None = None) -> None:
    """One DataError listing the first bad rows of a file and how many more there are (nothing if none)."""
    if problems:
        count = len(problems) if count is None else count
        listed = _listed(problems, count)
        raise DataError(f"{count} bad row(s) in {origin}: {listed}" + (f"; {hint}" if hint else ""))


def _listed(problems: list[str], count: int) -> str:
    more = f" (and {count - MAX_LISTED} more)" if count > MAX_LISTED else ""
    return "; ".join(problems[:MAX_LISTED]) + more


def read_column(path: Path, column: str, name: str, read: Callable[[dict, str], T]) -> list[T]:
    """Each cell of one column of a data file, read by `read(row, column)` as training reads a cell: a missing,
    empty or wrong-typed cell is a bad row, and bad rows are one DataError naming file, line and column (an empty
    prompt would be answered, a list's Python spelling labelled, without a word)."""
    split = read_file(path, name)
    if column not in split.columns:
        raise DataError(f"{path}: column {column!r} not found (columns: {', '.join(split.columns[:20])})")
    return convert_rows(split, lambda row: read(row, column), bad_rows=None)[0]


def read_texts(path: Path, column: str, name: str) -> list[str]:
    """The texts of one column of a data file (to label or score), bad cells as `read_column` says."""
    return read_column(path, column, name, cell_text)


def read_prompts(path: Path, column: str, name: str) -> list[str | list[dict[str, Any]]]:
    """The prompts of one column of a data file, to generate from: a text each, or a conversation (a message list,
    or a JSON string of one) whose next turn is to be answered; bad cells as `read_column` says."""
    return read_column(path, column, name, _prompt_cell)


def _prompt_cell(row: dict, column: str) -> str | list[dict[str, Any]]:
    value = row.get(column)
    if isinstance(value, list) or (isinstance(value, str) and is_messages(value)):
        return cell_messages(row, column, need_assistant=False, tool_calls=True)
    return cell_text(row, column)


def to_examples(split: Split, fmt: RowFormat, bad_rows: str = "error") -> list[dict[str, Any]]:
    """Every usable row as {"text": ...} or {"messages": [...]}; bad rows handled as `convert_rows` says."""
    return convert_rows(split, lambda row: convert_row(row, fmt), bad_rows)[0]


def convert_row(row: dict, fmt: RowFormat) -> dict[str, Any]:
    """One row as {"text": ...} or {"messages": [...]}; raises RowProblem when it cannot be used."""
    cols = fmt.columns
    if fmt.kind == "text":
        return {"text": cell_text(row, cols["text"])}
    if fmt.kind == "prompt_completion":
        prompt, completion = cell_text(row, cols["prompt"]), cell_text(row, cols["completion"])
        asked: Any = prompt
        if "image" in cols:
            asked = [*cell_images(row, cols["image"]), {"type": "text", "text": prompt}]
        return {"messages": [{"role": "user", "content": asked}, {"role": "assistant", "content": completion}]}
    if fmt.kind == "image_text":
        shown, caption = cell_images(row, cols["image"]), cell_text(row, cols["text"])
        return {"messages": [{"role": "user", "content": shown}, {"role": "assistant", "content": caption}]}
    if fmt.kind == "alpaca":
        user = {"role": "user", "content": cell_text(row, cols["instruction"])}
        # Read even when the rows the format was decided from (the first 1000) have no `input`: a file whose
        # first rows need no context must not lose the context of the later ones. Templates other than alpaca's
        # put it into the user turn's content (data/templates.py).
        context = cell_text(row, cols.get("input", "input"), allow_empty=True)
        if context.strip():
            user["input"] = context
        answer = {"role": "assistant", "content": cell_text(row, cols["output"])}
        return {"messages": with_system_column([*history_turns(row), user, answer], row)}
    column = cols["messages"]
    messages = with_system_column(cell_messages(row, column, tool_calls=True, images=True), row)
    example: dict[str, Any] = {"messages": with_row_images(messages, row, column) if fmt.images else messages}
    tools = cell_tools(row, TOOLS_COLUMN)
    if tools:
        example["tools"] = tools
    return example


def with_system_column(messages: list[dict[str, Any]], row: dict) -> list[dict[str, Any]]:
    """The row's `system` column (LLaMA-Factory's) as the conversation's system turn; a conversation that opens
    with its own system turn keeps that one, as LLaMA-Factory reads it."""
    system = cell_text(row, SYSTEM_COLUMN, allow_empty=True)
    if not system.strip() or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system}, *messages]


def system_from_column(row: dict, messages: list[dict[str, Any]]) -> bool:
    """Whether a conversation's system turn is the one its row's `system` column gave it (with_system_column): a
    template that takes no system turn (Gemma's) then names that column."""
    system = row.get(SYSTEM_COLUMN)
    opening = messages[0] if messages else {}
    return (
        isinstance(system, str)
        and bool(system.strip())
        and opening.get("role") == "system"
        and opening.get("content") == system
    )


def history_turns(row: dict) -> list[dict[str, str]]:
    """LLaMA-Factory's Alpaca `history` (a list of [instruction, answer] pairs, or a JSON string of one) as the
    turns before the row's own: a user turn and an answer each, trained on as any earlier answer of a chat is
    (`mask_history` leaves them out of the loss). None, blank or an empty list: no history."""
    value = row.get(HISTORY_COLUMN)
    if (
        value is None
        or (isinstance(value, str) and not value.strip())
        or (isinstance(value, float) and math.isnan(value))
    ):
        return []
    if isinstance(value, str):
        value = json_or_none(value)
    if not isinstance(value, list) or not all(isinstance(pair, (list, tuple)) and len(pair) == 2 for pair in value):
        raise RowProblem(HISTORY_COLUMN, "expected a list of [instruction, answer] pairs")
    turns = []
    for number, pair in enumerate(value, start=1):
        for role, text in zip(("user", "assistant"), pair, strict=True):
            what = "instruction" if role == "user" else "answer"
            if not isinstance(text, str) or not text.strip():
                got = "empty text" if isinstance(text, str) else describe_type(text)
                raise RowProblem(HISTORY_COLUMN, f"pair {number}'s {what} is not text (got {got})")
            check_unicode(text, HISTORY_COLUMN, f"pair {number}'s {what}")
            turns.append({"role": role, "content": text})
    return turns


def cell_images(row: dict, column: str) -> list[dict[str, Any]]:
    """A row's image column as image parts: one image (a path, data: URI, or a dataset's {"bytes", "path"}) or a
    list of them (a JSON string of one too); data/pipeline.py finds and opens them."""
    listed = _listed_images(row.get(column))
    if not listed or any(item is None or item == "" for item in listed):
        raise RowProblem(column, "missing image")
    return [{"type": "image", "image": item} for item in listed]


def cell_text(row: dict, column: str, allow_empty: bool = False) -> str:
    """The text of one cell; numbers become text. Missing (None, NaN as pandas writes it), wrong-typed or empty
    cells raise RowProblem; allow_empty lets an optional cell be missing or empty."""
    value = row.get(column)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        if allow_empty:
            return ""
        raise RowProblem(column, "missing value" if value is None else "missing value (NaN)")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and math.isinf(value):
            raise RowProblem(column, f"expected text, got the number {value}")
        value = str(value)
    if not isinstance(value, str):
        raise RowProblem(column, f"expected text, got {describe_type(value)}")
    check_unicode(value, column)
    if not allow_empty and not value.strip():
        raise RowProblem(column, "empty text")
    return value


def describe_type(value: Any) -> str:
    """How a user would call a value's type in their file (JSON words where there are any)."""
    names = {dict: "an object", list: "a list", bool: "true/false", int: "a number", float: "a number"}
    names.update({str: "text", type(None): "null", bytes: "binary data"})
    return names.get(type(value), type(value).__name__)


def check_unicode(text: str, column: str | None, what: str = "text") -> None:
    """JSON escapes can spell unpaired surrogates (\\ud800) that no tokenizer can encode: a bad row, not a crash."""
    if text.isascii():  # most text, and checked without copying it
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RowProblem(
            column, f"{what} holds {text[err.start]!r}, half of a UTF-16 surrogate pair (not valid Unicode)"
        ) from None


def cell_messages(
    row: dict, column: str, need_assistant: bool = True, tool_calls: bool = False, images: bool = False
) -> list[dict[str, Any]]:
    """The {role, content} messages of one cell (a list or a JSON string of one; ShareGPT's from/value too); a
    content that is a list of text parts becomes their text. With `tool_calls`, an assistant message may call
    tools (OpenAI's `tool_calls`, or its older `function_call`), kept in the form chat templates read, and a tool
    message keeps its `tool_call_id` and `name`. An assistant turn's reasoning (REASONING_KEYS) is kept as its
    `reasoning_content`. With `images`, a user or system turn may show images (data/images.py): its content is then
    kept as a list of text and image parts."""
    value = row.get(column)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise RowProblem(column, "missing value")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise RowProblem(column, f"not a JSON list of messages ({err.msg})") from None
        except (ValueError, RecursionError):
            raise RowProblem(column, "not a JSON list of messages (a number too long or nesting too deep)") from None
    if not isinstance(value, list) or not value:
        got = "an empty list" if value == [] else describe_type(value)
        raise RowProblem(column, f"expected a non-empty list of {{role, content}} messages, got {got}")
    messages = [_message(item, number, column, tool_calls, images) for number, item in enumerate(value, start=1)]
    learnable = ("tool_calls", "reasoning_content")
    answers = [m for m in messages if m["role"] == "assistant" and (m["content"].strip() or m.keys() & learnable)]
    if need_assistant and not answers:
        raise RowProblem(column, "no assistant message to learn from")
    return messages


def _message(item: Any, number: int, column: str, tool_calls: bool = False, images: bool = False) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise RowProblem(column, f"message {number} is not an object (got {describe_type(item)})")
    role, content = _role_and_content(item)
    if "from" in item and str(item["from"]).lower() == SHAREGPT_CALL:
        if not tool_calls:
            raise RowProblem(column, f"message {number} is a function_call turn: {TOOLS_TRAINED_BY}")
        item = {"tool_calls": _sharegpt_calls(content, number, column)}
        role, content = "assistant", None
    if role == "function":  # OpenAI's older name for a tool's result, beside function_call
        role = "tool"
    if not isinstance(role, str) or role not in ROLES:
        raise RowProblem(column, f"message {number} has unknown role {role!r} (use {', '.join(ROLES)})")
    calls = next((key for key in TOOL_CALL_KEYS if item.get(key)), None)  # empty `tool_calls` (exports) are none
    if calls and not tool_calls:
        # The pair methods and grpo render role and content alone: kept, such a turn would teach the model to
        # answer with nothing (content "") where it should call a tool.
        raise RowProblem(column, f"message {number} has {calls}: {TOOLS_TRAINED_BY}")
    if calls and role != "assistant":
        raise RowProblem(column, f"message {number} has {calls} but role {role!r}: only the assistant calls tools")
    reasoning = _reasoning(item, role, number, column)
    if content is None and not calls and not reasoning:
        raise RowProblem(column, f"message {number} has no content")
    content = "" if content is None else content
    if isinstance(content, list):
        content = _parts(content, number, column, role, images)
    if isinstance(content, list):  # text and images
        for part in content:
            if part["type"] == "text":
                check_unicode(part["text"], column, f"message {number} content")
        message: dict[str, Any] = {"role": role, "content": content}
        return message
    if not isinstance(content, str):
        raise RowProblem(column, f"message {number} content is not text (got {describe_type(content)})")
    check_unicode(content, column, f"message {number} content")
    message: dict[str, Any] = {"role": role, "content": content}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        raw = item[calls] if calls == "tool_calls" else [{"type": "function", "function": item[calls]}]
        message["tool_calls"] = _tool_calls(raw, number, column)
    for key in ("tool_call_id", "name"):  # a tool message's answer to a call (templates that show them read them)
        if role == "tool" and isinstance(item.get(key), str):
            message[key] = item[key]
    return message


def _role_and_content(item: dict) -> tuple[Any, Any]:
    """A message's role and content: OpenAI's role/content, or ShareGPT's from/value (its role names mapped)."""
    if "from" in item and "value" in item:
        return SHAREGPT_ROLES.get(str(item["from"]).lower(), item["from"]), item["value"]
    return item.get("role"), item.get("content")


def _sharegpt_calls(value: Any, number: int, column: str) -> list[Any]:
    """A ShareGPT `function_call` turn's calls: its value is the JSON of one call ({"name", "arguments"}, as
    LLaMA-Factory writes them) or of a list of them."""
    calls = json_or_none(value) if isinstance(value, str) else value
    calls = [calls] if isinstance(calls, dict) else calls
    if not isinstance(calls, list) or not calls:
        raise RowProblem(
            column,
            f'message {number} is a function_call whose value is not the JSON of a call ({{"name", '
            '"arguments"}) or of a list of them',
        )
    return calls


def _reasoning(item: dict, role: str, number: int, column: str) -> str | None:
    """The reasoning an assistant turn carries (REASONING_KEYS), None when it has none. Reasoning on another role's
    turn is a bad row: no template writes it there, and dropping it silently would train on less than the file says."""
    given = (key for key in REASONING_KEYS if item.get(key) is not None)
    key = next((key for key in given if not isinstance(item[key], str) or item[key].strip()), None)
    if key is None:  # none, or only empty ones
        return None
    value = item[key]
    if role != "assistant":
        raise RowProblem(column, f"message {number} has {key} but role {role!r}: only the assistant's turns reason")
    if not isinstance(value, str):
        raise RowProblem(column, f"message {number} {key} is not text (got {describe_type(value)})")
    check_unicode(value, column, f"message {number} {key}")
    return value


def _tool_calls(calls: Any, number: int, column: str) -> list[dict[str, Any]]:
    """A message's tool calls (`tool_call`), their arguments without nulls (a Parquet or hub dataset gives every
    call the keys any call has, as nulls)."""
    if not isinstance(calls, list):
        raise RowProblem(column, f"message {number}: tool_calls must be a list, got {describe_type(calls)}")
    out = []
    for call in calls:
        try:
            shaped = tool_call(call)
        except ValueError as err:
            raise RowProblem(column, f"message {number} has {err}") from None
        shaped["function"]["arguments"] = without_nulls(shaped["function"]["arguments"])
        out.append(shaped)
    return out


def tool_call(call: Any) -> dict[str, Any]:
    """One of OpenAI's tool calls as chat templates read it: {"type": "function", "function": {"name", "arguments"}},
    the arguments an object (OpenAI sends them as a JSON string; Llama 3.1's, Qwen2.5's and Mistral's templates
    write them with `tojson`; none or "" is no arguments), an `id` kept where there is one. The function's fields
    may stand at the top (a call written without `function`). ValueError naming what is wrong ("a tool call ..."),
    for a caller that says where: training data (a bad row) and `serve` (a 400) read calls alike."""
    # a flat call in a Parquet or hub dataset beside nested ones has "function": null
    function = (call.get("function") or call) if isinstance(call, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name.strip():
        raise ValueError("a tool call without a function name")
    arguments = function.get("arguments")
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        arguments = {}
    elif isinstance(arguments, str):
        arguments = json_or_none(arguments)
    if not isinstance(arguments, dict):
        raise ValueError(f"a tool call to {name!r} whose arguments are not a JSON object")
    shaped: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
    return shaped | ({"id": call["id"]} if isinstance(call.get("id"), str) else {})


def cell_tools(row: dict, column: str) -> list[dict[str, Any]] | None:
    """The tool definitions of a conversation (a `tools` column: a list of JSON schemas, or a JSON string of one),
    handed to the chat template as transformers' apply_chat_template hands them; None when the row has none."""
    value = row.get(column)
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        value = json_or_none(value)
    if not isinstance(value, list) or not all(isinstance(tool, dict) for tool in value):
        raise RowProblem(column, "expected a list of tool definitions (JSON schemas, as OpenAI's `tools`)")
    for tool in value:
        name = tool.get("function", tool).get("name") if isinstance(tool.get("function", tool), dict) else None
        if not isinstance(name, str) or not name.strip():
            raise RowProblem(column, "a tool definition without a function name")
    # in OpenAI's wrapped form, as a served request hands them to the template (a bare definition is a function's)
    wrapped = [tool if "function" in tool else {"type": "function", "function": tool} for tool in value]
    return [without_nulls(tool) for tool in wrapped] or None


def without_nulls(value: Any) -> Any:
    """Objects without their null members, all the way down. Parquet (and hub datasets) store a column of objects
    as one struct type: each row's object gains every other row's keys as nulls (get_weather's arguments a null
    "tz" that only get_time takes), which the template would write and the model learn. A null that was meant is
    dropped with them: an absent argument says the same to a tool."""
    if isinstance(value, dict):
        return {key: without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [without_nulls(item) for item in value]
    return value


def _parts(parts: list, number: int, column: str, role: str = "user", images: bool = False) -> str | list[dict]:
    """The text of OpenAI-style content parts, [{"type": "text", "text": ...}, ...]; other parts are bad rows, but
    for image parts where `images` allows them (a user or system turn): the parts are then kept as a list, text parts
    as {"type": "text", "text"} and images as {"type": "image", "image": what it points at} (None: the row's next
    image, data/images.py).

    The texts are joined with nothing between them: that is what the models' own chat templates do with such a
    list (Qwen2-VL, Llama 3.2 Vision and SmolVLM write each part's text straight after the last; transformers and
    TRL hand the list to the template as it is), and what `tunelab serve` does with the parts of a request, so a
    model is served the same text it was trained on."""
    if not parts:
        raise RowProblem(column, f"message {number} has an empty list of content parts")
    texts: list[Any] = []
    for part in parts:
        if not isinstance(part, dict):
            raise RowProblem(
                column,
                f"message {number} content is not text (a list holding {describe_type(part)}; "
                'content parts are objects such as {"type": "text", "text": "..."})',
            )
        if images and isinstance(part.get("type"), str) and MEDIA_PARTS.get(part["type"]) == "image":
            if role not in ("user", "system"):
                raise RowProblem(
                    column, f"message {number} ({role}) has an image part: only user and system turns show images"
                )
            texts.append({"type": "image", "image": image_ref(part)})
            continue
        texts.append(_part_text(part, number, column))
    if all(isinstance(text, str) for text in texts):
        return "".join(texts)
    return [{"type": "text", "text": text} if isinstance(text, str) else text for text in texts]


def checked_images(
    messages: list[dict[str, Any]], column: str | None, folder: Path | None, refused: str | None
) -> list[str | bytes]:
    """A conversation's images in order, each found and opened (data/images.checked_ref, paths relative to `folder`);
    RowProblem naming `column` when one cannot be, or when the run cannot take images (`refused` says why)."""
    found = image_parts(messages)
    if found and refused is not None:
        raise RowProblem(column, f"message {found[0][0]} has an image part, but {refused}")
    refs = []
    for number, value in found:
        try:
            refs.append(checked_ref(value, folder))
        except ImageProblem as err:
            raise RowProblem(column, f"message {number}: {err}") from None
    return refs


def with_row_images(
    messages: list[dict[str, Any]], row: dict, column: str, images_column: str | None = None
) -> list[dict[str, Any]]:
    """A conversation's images taken from the row's `images` column (IMAGE_COLUMNS, or `images_column` when given)
    in order: by its bare `{"type": "image"}` parts (TRL's form), by `<image>` in its user turns' text
    (LLaMA-Factory's), or, with neither, at the start of its first user turn (as TRL places them); the count must
    match."""
    names = (images_column,) if images_column else IMAGE_COLUMNS
    listed = _listed_images(next((row[name] for name in names if row.get(name) is not None), None))
    bare = _bare_images(messages)
    if listed and not bare:
        messages = [_tagged(m) for m in messages]
        bare = _bare_images(messages)
    if listed and not bare and not any(isinstance(m["content"], list) for m in messages):
        messages = _leading_images(messages, len(listed))
        bare = _bare_images(messages)
    if bare != len(listed):
        shown_in = next((name for name in names if name in row), names[0])
        raise RowProblem(
            column if bare else shown_in,
            f"{bare} image place(s) in the messages for {len(listed)} image(s) in column {shown_in!r}",
        )
    if not bare:
        return messages
    queue = iter(listed)
    return [
        {**m, "content": [{**p, "image": next(queue)} if p.get("image", 0) is None else p for p in m["content"]]}
        if isinstance(m["content"], list)
        else m
        for m in messages
    ]


def image_column_of(row: dict, images_column: str | None = None) -> str | None:
    """The row's column that lists images (IMAGE_COLUMNS, or `images_column`), when it lists any."""
    names = (images_column,) if images_column else IMAGE_COLUMNS
    return next((name for name in names if _listed_images(row.get(name))), None)


def refuse_image_columns(split: Split, images_column: str | None, why: str) -> None:
    """A split some of whose rows list images in an images column, for a run that cannot take them: one DataError
    naming the first such row (the column would otherwise go unread, the images never shown)."""
    for index, row in enumerate(split.rows):
        column = image_column_of(row, images_column)
        if column is not None:
            raise DataError(f"{split.where(index)}: column {column!r} lists images, but {why}")


def _listed_images(value: Any) -> list[Any]:
    """An image cell as a list: one image, a list of them, or a JSON string of a list (none: [])."""
    if isinstance(value, str) and value.startswith("["):
        value = json_or_none(value)
    return value if isinstance(value, list) else [] if value is None else [value]


def _leading_images(messages: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """`count` bare image parts before the first user turn's text."""
    first = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if first is None:
        return messages
    shown = [{"type": "image", "image": None} for _ in range(count)]
    turn = messages[first]
    return [
        *messages[:first],
        {**turn, "content": [*shown, {"type": "text", "text": turn["content"]}]},
        *messages[first + 1 :],
    ]


def _bare_images(messages: list[dict[str, Any]]) -> int:
    """How many image parts wait for the row's `images` column (bare: {"type": "image"})."""
    lists = [m["content"] for m in messages if isinstance(m["content"], list)]
    return sum(1 for parts in lists for part in parts if part.get("image", 0) is None)


def _tagged(message: dict[str, Any]) -> dict[str, Any]:
    """A user turn's text with `<image>` marks as text and bare image parts (LLaMA-Factory's datasets)."""
    content = message["content"]
    if message["role"] != "user" or not isinstance(content, str) or IMAGE_TAG not in content:
        return message
    parts: list[dict[str, Any]] = []
    for number, piece in enumerate(content.split(IMAGE_TAG)):
        if number:
            parts.append({"type": "image", "image": None})
        if piece.strip():
            parts.append({"type": "text", "text": piece})
    return {**message, "content": parts}


def _part_text(part: dict, number: int, column: str) -> str:
    kind = part.get("type")
    media = MEDIA_PARTS.get(kind) if isinstance(kind, str) else None
    if media:
        article = "an" if media[0] in "aeiou" else "a"
        why = "images are trained by sft, dpo, orpo, simpo or grpo, on a vision-language model"
        why = why if media == "image" else "tunelab trains on text"
        if media != "image":
            why += " and images"
        raise RowProblem(
            column,
            f"message {number} has {article} {media} part: {why}; drop the {media} parts or describe them in text",
        )
    if kind is None:
        raise RowProblem(column, f'message {number} has a content part without a "type" (use {{"type": "text", ...}})')
    if kind != "text":
        raise RowProblem(column, f'message {number} has a content part of unknown type {kind!r} (use "text")')
    text = part.get("text")
    if not isinstance(text, str):
        raise RowProblem(column, f"message {number} has a text part whose text is {describe_type(text)}, not text")
    return text
