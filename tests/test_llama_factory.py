"""LLaMA-Factory's sft datasets read as it reads them: an Alpaca row's `system` and `history`, ShareGPT's
`function_call` and `observation` turns with a `tools` column (its glaive_toolcall demo's form), a `system` column
beside a conversation. Each gives the tokens and the loss of the same conversation written in OpenAI's form."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.config.llm import LLMParams
from tunelab.errors import DataError


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _examples(tiny_llama: Path, data: Path, tmp_path: Path, **extra) -> list[tuple[list[int], list[int]]]:
    from tunelab.tasks.llm import prepare

    values = {"trainer": "sft", "chat_template": "chatml", "block_size": 512, **extra}
    params = LLMParams(model=str(tiny_llama), data_path=str(data), project_name=str(tmp_path / "run"), **values)
    return [(list(example.input_ids), list(example.labels)) for example in prepare(params).data.train]


def test_an_alpaca_row_s_system_and_history_are_its_conversation(tiny_llama, tmp_path):
    """{"instruction", "input", "output", "system", "history": [[q, a], ...]} trains as the chat [system, q, a, ...,
    instruction + input, output]: every answer carries the loss (history's too), and mask_history keeps the last."""
    history = [["Name a colour.", "Blue."], ["And another?", "Red."]]
    alpaca = {"instruction": "Which is warmer?", "input": "Blue or red.", "output": "Red.", "system": "Be brief."}
    rows = [{**alpaca, "history": history}, {**alpaca, "history": json.dumps(history)}]  # a CSV's JSON string too
    rows += [{**alpaca, "history": [], "system": ""}, {**alpaca, "history": None, "system": None}]  # none at all
    turns = [{"role": "system", "content": "Be brief."}]
    for asked, answered in history:
        turns += [{"role": "user", "content": asked}, {"role": "assistant", "content": answered}]
    last = [{"role": "user", "content": "Which is warmer?\n\nBlue or red."}, {"role": "assistant", "content": "Red."}]
    chats = [{"messages": turns + last}, {"messages": turns + last}, {"messages": last}, {"messages": last}]

    ours = _examples(tiny_llama, _write(tmp_path / "alpaca.jsonl", rows), tmp_path)
    expected = _examples(tiny_llama, _write(tmp_path / "chats.jsonl", chats), tmp_path)
    assert ours == expected
    assert sum(label == -100 for label in ours[0][1]) < len(ours[0][1]) - 12  # three answers trained, not one
    masked = _examples(tiny_llama, tmp_path / "alpaca.jsonl", tmp_path, mask_history=True)
    assert masked == _examples(tiny_llama, tmp_path / "chats.jsonl", tmp_path, mask_history=True)
    assert masked[0][1] != ours[0][1]


def test_an_alpaca_row_s_history_in_the_alpaca_template(tiny_llama, tmp_path):
    """With chat_template unset (Alpaca rows get the alpaca template), the system turn takes the preamble's place
    and each earlier pair is its own Instruction / Response section, its answer trained."""
    from transformers import AutoTokenizer

    row = {"instruction": "Which is warmer?", "input": "Blue or red.", "output": "Red.", "system": "Be brief."}
    rows = [{**row, "history": [["Name a colour.", "Blue."]]}, {"instruction": "Hi.", "output": "Hello."}]
    examples = _examples(tiny_llama, _write(tmp_path / "alpaca.jsonl", rows), tmp_path, chat_template=None)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    texts = [tokenizer.decode(ids) for ids, _ in examples]
    trained = [
        tokenizer.decode([t for t, label in zip(*example, strict=True) if label != -100]) for example in examples
    ]
    assert texts[0] == (
        "Be brief.\n\n### Instruction:\nName a colour.\n\n### Response:\nBlue.</s>\n\n### Instruction:\n"
        "Which is warmer?\n\n### Input:\nBlue or red.\n\n### Response:\nRed.</s>"
    )
    assert trained[0] == "Blue.</s>Red.</s>"
    assert texts[1].startswith("Below is an instruction that describes a task. Write a response that appropriately")


def test_sharegpt_tool_turns_and_system_column_are_openai_s(tiny_llama, tmp_path):
    """glaive_toolcall's form: a `function_call` turn holding the call's JSON (or a list of calls), an `observation`
    turn for the result, the definitions as a JSON string in `tools`, the system prompt in a `system` column."""
    weather = {"name": "get_weather", "description": "Weather now", "parameters": {"type": "object"}}
    calls = [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_weather", "arguments": {}}]
    conversation = [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps(calls[0])},
        {"from": "observation", "value": "18 C"},
        {"from": "gpt", "value": "It is 18 C."},
        {"from": "human", "value": "And here?"},
        {"from": "function_call", "value": json.dumps(calls)},
        {"from": "observation", "value": "18 C; 12 C"},
        {"from": "gpt", "value": "12 C here."},
    ]
    row = {"conversations": conversation, "tools": json.dumps([weather]), "system": "Use tools."}
    ours = _examples(tiny_llama, _write(tmp_path / "glaive.jsonl", [row] * 2), tmp_path)

    def openai(call_list: list[dict]) -> dict:
        shaped = [{"type": "function", "function": call} for call in call_list]
        return {"role": "assistant", "content": None, "tool_calls": shaped}

    messages = [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris?"},
        openai(calls[:1]),
        {"role": "tool", "content": "18 C"},
        {"role": "assistant", "content": "It is 18 C."},
        {"role": "user", "content": "And here?"},
        openai(calls),
        {"role": "tool", "content": "18 C; 12 C"},
        {"role": "assistant", "content": "12 C here."},
    ]
    tools = [{"type": "function", "function": weather}]
    expected = _examples(
        tiny_llama, _write(tmp_path / "openai.jsonl", [{"messages": messages, "tools": tools}] * 2), tmp_path
    )
    assert ours == expected

    # a conversation that opens with its own system turn keeps it (LLaMA-Factory's rule), the column unread
    own = [{"from": "system", "value": "Use tools."}, *conversation]
    kept = _examples(
        tiny_llama, _write(tmp_path / "own.jsonl", [{**row, "conversations": own, "system": "No."}]), tmp_path
    )
    assert kept == expected[:1]


@pytest.mark.parametrize(
    ("row", "said"),
    [
        ({"history": [["Hi."]]}, "column 'history': expected a list of [instruction, answer] pairs"),
        ({"history": "not json"}, "column 'history': expected a list of [instruction, answer] pairs"),
        ({"history": [["Hi.", " "]]}, "column 'history': pair 1's answer is not text (got empty text)"),
        ({"history": [["Hi.", 3]]}, "column 'history': pair 1's answer is not text (got a number)"),
        ({"system": {"text": "x"}}, "column 'system': expected text, got an object"),
    ],
)
def test_a_bad_history_or_system_is_a_named_bad_row(tiny_llama, tmp_path, capsys, row, said):
    from tunelab.cli import main

    good = {"instruction": "Name a colour.", "output": "Blue."}
    data = _write(tmp_path / "alpaca.jsonl", [good, {**good, **row}])
    args = ["llm", "--dry-run", "--model", str(tiny_llama), "--data-path", str(data), "--chat-template", "chatml"]
    assert main([*args, "--project-name", str(tmp_path / "run")]) == 2
    assert f"{data} line 2, {said}" in capsys.readouterr().err


def test_a_function_call_turn_that_is_no_call_is_a_named_bad_row(tiny_llama, tmp_path):
    turns = [{"from": "human", "value": "Hi?"}, {"from": "function_call", "value": "get_weather"}]
    turns.append({"from": "gpt", "value": "Hello."})
    data = _write(tmp_path / "calls.jsonl", [{"conversations": turns}])
    with pytest.raises(DataError, match="line 1, column 'conversations': message 2 is a function_call whose value"):
        _examples(tiny_llama, data, tmp_path)


def test_a_system_column_the_template_takes_no_system_turn_for_names_that_column(tiny_llama, tmp_path, capsys):
    """A template that refuses system turns (Gemma's raise) names the `system` column that gave the row one."""
    from tunelab.cli import main

    template = tmp_path / "no-system.jinja"
    template.write_text(
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m.role + ': ' + m.content + eos_token }}{% endfor %}"
    )
    rows = [{"instruction": "Hi.", "output": "Hello."}, {"instruction": "Hi.", "output": "Hello.", "system": "Be."}]
    data = _write(tmp_path / "alpaca.jsonl", rows)
    args = ["llm", "--dry-run", "--model", str(tiny_llama), "--data-path", str(data), "--chat-template", str(template)]
    assert main([*args, "--project-name", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    said = "column 'system': the chat template cannot render it as the system turn (System role not supported)"
    assert f"{data} line 2, {said}" in err


def test_a_function_call_turn_in_a_pair_is_refused_as_one(tmp_path, tiny_tokenizer):
    from tests.test_preference import _params
    from tunelab.data.preference import load_preference_data

    call = {"from": "function_call", "value": "not even JSON"}
    row = {"conversations": [{"from": "human", "value": "Hi?"}, call, {"from": "observation", "value": "x"}]}
    row |= {"chosen": {"from": "gpt", "value": "A."}, "rejected": {"from": "gpt", "value": "B."}}
    data = _write(tmp_path / "pairs.jsonl", [row])
    with pytest.raises(DataError, match="column 'conversations': message 2 is a function_call turn: tool calls are"):
        load_preference_data(_params(data_path=str(data)), tiny_tokenizer)
