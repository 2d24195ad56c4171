"""`tools` (TRL's): Python functions the model may call while it writes a completion (grpo, rloo, online_dpo).

The prompts are rendered with the tools' schemas (transformers builds them from each function's type hints and
docstring; data/prompts.py). Sampling (methods/completions.py) hands each completion here once it ends: the calls it
wrote, in the form its chat template writes them (inference/tool_calls.py: Hermes' `<tool_call>`, Mistral's,
Llama 3's JSON), are run, and their results rendered as the template renders tool turns, with the generation prompt
after them; the model then writes on from there, and again while it calls tools, at most
max_tool_calling_iterations rounds. A tool's result goes back as its text (a dict or a list as JSON), an error as
{"error": "..."}: the model learns from it, and the run goes on.

The tool turns' tokens are part of what the model reads, but not trained on (their loss mask is 0), and count
towards max_completion_length: where a round's results leave no room for a token of answer, they are dropped (the
tools did run, as TRL's do: their calls count) and the completion ends with its calls. The rewards receive such a
completion as its messages, as TRL gives them: the assistant turns (a call's arguments an object) and the tool turns
between them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections.abc import Callable
from typing import Any

from tunelab.errors import ConfigError
from tunelab.user_code import awaited, user_function

log = logging.getLogger("tunelab")

GenerateMore = Callable[[list[list[int]], list[int]], list[list[int]]]


def load_tools(spec: str) -> list[Callable[..., Any]]:
    """The functions `tools` names (file.py:function, comma-separated), each name once."""
    tools = [user_function(name.strip(), "tool", ConfigError) for name in spec.split(",") if name.strip()]
    names = [tool.__name__ for tool in tools]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ConfigError(f"tools: two functions are named {twice[0]!r}: the model calls a tool by its name")
    return tools


def tool_schemas(tools: list[Callable[..., Any]]) -> list[dict[str, Any]]:
    """Each tool's JSON schema, as transformers hands it to a chat template; ConfigError in one line for a function
    whose schema cannot be built (an argument without a type hint or a line in the docstring's Args:)."""
    from transformers.utils import get_json_schema

    schemas = []
    for tool in tools:
        try:
            schemas.append(get_json_schema(tool))
        except Exception as error:  # noqa: BLE001 - transformers' parsing errors, as one line
            raise ConfigError(
                f"tools: {tool.__name__}: {error} (a tool's schema comes from its type hints and its docstring: a "
                "summary line, then Args: with a line for each argument)"
            ) from None
    return schemas


def check_template(spec: str, tokenizer: Any, source: str) -> None:
    """The run's chat template (`source`) tried with its tools before the model loads: it must write a call in a
    form read here and render a tool turn after it (ToolRunner's checks), or the run is refused in one line."""
    from tunelab.models.turns import turn_end

    trial = copy.copy(tokenizer)  # (the run's template, on a copy: the caller's tokenizer is left as it is)
    trial.chat_template = source
    ToolRunner(load_tools(spec), trial, turn_end(trial)[0])


def tool_result(result: Any) -> str:
    """A tool's result as the text of its turn: a string as it is, a dict or a list as JSON, anything else as str."""
    if isinstance(result, str):
        return result
    if isinstance(result, (dict, list)):
        return json.dumps(result, ensure_ascii=False, default=str)
    return str(result)


class ToolRunner:
    """Reads the calls in what the model wrote, runs them, and gives the tokens of their results' turns. Made, it
    has checked the chat template: it writes a stand-in call in a form read here, and renders a tool turn after it
    (a template that cannot is refused in one line, by the dry run)."""

    def __init__(self, tools: list[Callable[..., Any]], tokenizer: Any, end_ids: list[int]) -> None:
        from tunelab.inference.streaming import keeping
        from tunelab.inference.tool_calls import form_for

        self.tools = {tool.__name__: tool for tool in tools}
        self.tokenizer, self.end_ids = tokenizer, list(end_ids)
        self.form = form_for(tokenizer)
        self.decoder = keeping(tokenizer, self.form.markers)
        self.calls = self.failures = 0
        self.warned: set[str] = set()
        name = next(iter(self.tools))
        if not self.read(self._stand_in_call(name)).get("tool_calls"):
            raise ConfigError(
                "tools: the chat template writes tool calls in a form tunelab does not read (it reads Hermes' "
                "<tool_call> JSON, Mistral's [TOOL_CALLS] and Llama 3's JSON): the model's calls would never run"
            )
        trial = self.suffix_ids(
            [{"role": "tool", "name": name, "content": _STAND_IN_RESULT, "tool_call_id": _STAND_IN_ID}]
        )
        if _STAND_IN_RESULT not in tokenizer.decode(trial):
            raise ConfigError("tools: the chat template leaves a tool turn's result out of the conversation")

    def read(self, ids: list[int]) -> dict[str, Any]:
        """The assistant message a stretch of the model's writing holds (its end token left out): its text and, if
        it wrote calls in its template's form, `tool_calls` (TRL's form: arguments an object; an id of Mistral's
        form, from the text: the same writing gets the same id, so a resumed run samples what this one did)."""
        ids = ids[:-1] if ids and ids[-1] in self.end_ids else ids
        content, calls = self.form.read(self.decoder.decode(ids, skip_special_tokens=True))
        message: dict[str, Any] = {"role": "assistant", "content": (content or "").strip()}
        if calls:
            message["tool_calls"] = [
                {
                    "id": hashlib.sha256(json.dumps([ids, j]).encode()).hexdigest()[:9],
                    "type": "function",
                    "function": {"name": c["function"]["name"], "arguments": _object(c)},
                }
                for j, c in enumerate(calls)
            ]
        return message

    def run(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        """The tool turns answering a message's calls: each tool run with the arguments the model wrote; a failure
        (no such tool, wrong arguments, an exception) is the turn's {"error": ...}."""
        turns = []
        for call in message["tool_calls"]:
            self.calls += 1
            name, arguments = call["function"]["name"], call["function"]["arguments"]
            try:
                if name not in self.tools:
                    raise ValueError(f"no tool named {name!r} (tools: {', '.join(self.tools)})")
                # (an `async def` tool awaited; a result JSON cannot write fails too)
                content = tool_result(awaited(self.tools[name](**arguments)))
            except Exception as error:  # noqa: BLE001 - the model's call failed: it is told, and goes on
                self.failures += 1
                content = json.dumps({"error": f"{type(error).__name__}: {error}"}, ensure_ascii=False)
            turn = {"role": "tool", "name": name, "content": content}
            turns.append(turn | ({"tool_call_id": call["id"]} if "id" in call else {}))
        return turns

    def suffix_ids(self, turns: list[dict[str, Any]]) -> list[int]:
        """The tokens after an assistant turn's end token that hold tool turns and the generation prompt, as the
        chat template renders them: measured on a stand-in conversation (a user turn, a call of the first turn's
        tool), after as many end tokens as the conversation before the tool turns holds. (Counted, not compared:
        templates such as Qwen3's write an assistant turn differently once it is not the last.)"""
        head = self._head(turns[0]["name"], turns[0].get("tool_call_id", _STAND_IN_ID))
        try:
            before = self._ids(self.tokenizer.apply_chat_template(head, tokenize=False))
            after = self._ids(
                self.tokenizer.apply_chat_template([*head, *turns], tokenize=False, add_generation_prompt=True)
            )
        except Exception as error:  # noqa: BLE001 - the template's own error, as one line
            raise ConfigError(f"tools: the chat template cannot render a tool turn after a call ({error})") from None
        turn_ends = sum(token in self.end_ids for token in before)
        ends = [i for i, token in enumerate(after) if token in self.end_ids]
        if not turn_ends or len(ends) < turn_ends:  # (Mistral's tool turn ends with no end token: none after)
            raise ConfigError(
                "tools: the chat template ends no turn with an end token the model stops at, so a tool turn cannot "
                "follow what the model wrote"
            )
        return after[ends[turn_ends - 1] + 1 :]

    def _stand_in_call(self, name: str) -> list[int]:
        """The tokens of an assistant turn calling `name`, as the template writes one (through its end token): the
        text after the chat rendered with the generation prompt, or after the lines the two share (a thinking
        template's generation prompt may open a think block the answered turn does not write)."""
        head = self._head(name, _STAND_IN_ID)
        try:
            asked = self.tokenizer.apply_chat_template(head[:1], tokenize=False, add_generation_prompt=True)
            answered = self.tokenizer.apply_chat_template(head, tokenize=False)
        except Exception as error:  # noqa: BLE001 - the template's own error, as one line
            raise ConfigError(f"tools: the chat template cannot render a tool call ({error})") from None
        shared = len(asked)
        if not answered.startswith(asked):  # back to the last line both share (not inside a tag: `<t` of two)
            common = os.path.commonprefix([asked, answered])
            shared = common.rfind("\n") + 1 or len(common)
        written = self._ids(answered[shared:])
        ends = [i for i, token in enumerate(written) if token in self.end_ids]
        return written[: ends[0] + 1] if ends else written

    @staticmethod
    def _head(name: str, call_id: str) -> list[dict[str, Any]]:
        call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": {}}}
        return [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [call]}]

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


_STAND_IN_ID = "a1b2c3d4e"  # (9 letters and digits: Mistral's templates refuse other call ids)
_STAND_IN_RESULT = "tunelab_stand_in_result"


def _object(call: dict[str, Any]) -> dict[str, Any]:
    return json.loads(call["function"]["arguments"])  # (ToolCallForm.read wrote it from an object)


def call_tools(
    runner: ToolRunner,
    prompts: list[list[int]],
    written: list[list[int]],
    budget: int,
    rounds: int | None,
    generate_more: GenerateMore,
    anyone_calling: Callable[[bool], bool] = bool,
) -> tuple[list[list[int]], list[list[int]], list[int], list[list[dict[str, Any]]]]:
    """Each completion carried on through its tool calls: (its ids, its mask (0 on tool turns), where its last
    stretch of the model's writing starts, its messages). `written`: what the model wrote after each prompt, through
    its end token (or cut at `budget`); `generate_more(inputs, budgets)` samples on from each input, up to its
    budget of tokens, through the end token. `anyone_calling(calling)`: whether any process still calls tools this
    round (several processes: each generate call of a sharded model (FSDP, ZeRO-3) needs every process, so one
    with no calls left samples a token beside the others until all are done)."""
    completions = [list(ids) for ids in written]
    masks = [[1] * len(ids) for ids in written]
    starts = [0] * len(written)
    messages = [[runner.read(ids)] for ids in written]
    calling = [i for i, ids in enumerate(written) if _ended(runner, ids) and "tool_calls" in messages[i][-1]]
    done = 0
    while True:
        going = []
        for i in calling if rounds is None or done < rounds else []:
            turns = runner.run(messages[i][-1])
            try:
                suffix = runner.suffix_ids(turns)
            except ConfigError as error:  # (tried at the start: a template failing on these results alone)
                if str(error) not in runner.warned:
                    runner.warned.add(str(error))
                    log.warning("%s: such completions end with their calls", error)
                continue  # (its results dropped, as where there is no room: the other processes are not left waiting)
            if len(completions[i]) + len(suffix) >= budget:  # no room left to answer: it ends with its calls
                continue
            messages[i] += turns
            completions[i] += suffix
            masks[i] += [0] * len(suffix)
            starts[i] = len(completions[i])
            going.append(i)
        if not anyone_calling(bool(going)):
            break
        inputs = [prompts[i] + completions[i] for i in going] or [prompts[0]]  # (idle: one token, kept nowhere)
        more = generate_more(inputs, [budget - len(completions[i]) for i in going] or [1])
        calling = []
        for i, ids in zip(going, more if going else [], strict=True):
            completions[i] += ids
            masks[i] += [1] * len(ids)
            messages[i].append(runner.read(ids))
            if _ended(runner, ids) and "tool_calls" in messages[i][-1]:
                calling.append(i)
        done += 1
    return completions, masks, starts, messages


def _ended(runner: ToolRunner, ids: list[int]) -> bool:
    return bool(ids) and ids[-1] in runner.end_ids


def transcript(messages: list[dict[str, Any]]) -> str:
    """A completion's turns as text to read (completions.jsonl): the model's writing, its calls, the tools' results."""
    lines = []
    for message in messages:
        if message["role"] == "tool":
            lines.append(f"[{message['name']} returned] {message['content']}")
            continue
        if message["content"]:
            lines.append(message["content"])
        for call in message.get("tool_calls", []):
            function = call["function"]
            lines.append(f"[calls {function['name']}({json.dumps(function['arguments'], ensure_ascii=False)})]")
    return "\n".join(lines)
