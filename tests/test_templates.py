"""Every chat template's exact text for a two-turn conversation, and the assistant spans it marks."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

from tunelab.data.formats import RowFormat
from tunelab.data.templates import render_messages, template_source
from tunelab.errors import ConfigError

CONVERSATION = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "How are you?"},
    {"role": "assistant", "content": "Fine."},
]

EXPECTED = {
    "chatml": (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\nFine.<|im_end|>\n"
    ),
    "zephyr": "<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n<|user|>\nHow are you?</s>\n<|assistant|>\nFine.</s>\n",
    "none": "HiHello!</s>How are you?Fine.</s>",
    "alpaca": (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nHi\n\n### Response:\nHello!</s>\n\n"
        "### Instruction:\nHow are you?\n\n### Response:\nFine.</s>"  # the preamble opens the chat once
    ),
    # the tiny test tokenizer carries a ChatML template of its own
    "tokenizer": (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\nFine.<|im_end|>\n"
    ),
}

ANSWERS = {
    "chatml": ["Hello!<|im_end|>\n", "Fine.<|im_end|>\n"],
    "zephyr": ["Hello!</s>\n", "Fine.</s>\n"],
    "none": ["Hello!</s>", "Fine.</s>"],
    "alpaca": ["Hello!</s>", "Fine.</s>"],  # the separator between examples is not trained
    "tokenizer": ["Hello!<|im_end|>\n", "Fine.<|im_end|>\n"],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_template_renders_exact_text_and_answer_spans(name, tiny_tokenizer):
    rendered = render_messages(CONVERSATION, template_source(name, tiny_tokenizer), tiny_tokenizer)
    assert rendered.text == EXPECTED[name]
    assert [rendered.text[a:b] for a, b in rendered.spans] == ANSWERS[name]


def test_alpaca_template_with_input():
    from tests.conftest import build_tokenizer  # noqa: F401 - only the template matters here

    class Tok:
        eos_token = "</s>"

        def apply_chat_template(self, messages, chat_template, tokenize, add_generation_prompt):
            from transformers.utils.chat_template_utils import render_jinja_template

            batch = messages if isinstance(messages[0], list) else [messages]
            texts = render_jinja_template(
                batch, chat_template=chat_template, eos_token="</s>", add_generation_prompt=add_generation_prompt
            )[0]
            return texts if batch is messages else texts[0]

    messages = [{"role": "user", "content": "Sum these", "input": "1, 2"}, {"role": "assistant", "content": "3"}]
    rendered = render_messages(messages, template_source("alpaca", None), Tok())
    assert rendered.text == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nSum these\n\n"
        "### Input:\n1, 2\n\n### Response:\n3</s>"
    )
    assert [rendered.text[a:b] for a, b in rendered.spans] == ["3</s>"]


def test_unknown_template_is_a_clear_error(tiny_tokenizer):
    with pytest.raises(
        ConfigError, match="chat_template: 'llama9' is not one of none, zephyr, chatml, tokenizer, alpaca, nor"
    ):
        template_source("llama9", tiny_tokenizer)


def test_tokenizer_template_missing_is_a_clear_error(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    with pytest.raises(ConfigError, match="has no chat template"):
        template_source("tokenizer", tok)


# ---- the user's own template: a .jinja file or the Jinja itself

OWN = (
    "{% for m in messages %}{{ '[' + m['role'] + '] ' + m['content'] }}{% if m['role'] == 'assistant' %}"
    "{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}"
)


def test_a_template_file_or_inline_jinja_renders_with_its_answer_spans(tiny_tokenizer, tmp_path):
    path = tmp_path / "mine.jinja"
    path.write_text(OWN, encoding="utf-8")
    for given in (str(path), OWN):
        rendered = render_messages(CONVERSATION, template_source(given, tiny_tokenizer), tiny_tokenizer)
        assert rendered.text == "[user] Hi\n[assistant] Hello!</s>\n[user] How are you?\n[assistant] Fine.</s>\n"
        assert [rendered.text[a:b] for a, b in rendered.spans] == ["Hello!</s>\n", "Fine.</s>\n"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "{% for m in messages %}{{ m['content'] }}",
            "chat_template .*mine.jinja, line 1: Unexpected end of template",
        ),
        (None, "cannot read the template file .*mine.jinja: No such file or directory"),
    ],
)
def test_a_template_file_that_cannot_be_used_is_one_line(tiny_llama, tmp_path, capsys, text, message):
    import re

    from tunelab.cli import main

    path = tmp_path / "mine.jinja"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    data = tmp_path / "chat.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}\n')
    args = ["llm", "--dry-run", "--model", str(tiny_llama), "--data-path", str(data), "--trainer", "sft"]
    assert main([*args, "--text-column", "messages", "--chat-template", str(path)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err, err


def test_a_run_trains_with_its_own_template_and_keeps_it(tiny_llama, tmp_path):
    """The template of a config file (inline), its loss on the answers only, and the run's tokenizer carrying it
    so that chat, generate and serve format prompts as training did; an edited template file is prepared again."""
    import dataclasses
    import json

    import yaml
    from transformers import AutoTokenizer

    from tunelab.cli import main
    from tunelab.config import load_config
    from tunelab.tasks.llm import prepare

    data = tmp_path / "chat.jsonl"
    rows = [[{"role": "user", "content": f"Say {n}"}, {"role": "assistant", "content": f"{n}!"}] for n in range(8)]
    data.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    config = {
        "task": "llm-sft", "base_model": str(tiny_llama), "project_name": str(tmp_path / "run"),
        "data": {"path": str(data), "chat_template": OWN, "column_mapping": {"text_column": "messages"}},
        "params": {"max_steps": 2, "batch_size": 4, "gradient_accumulation": 1, "block_size": 64},
    }  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    params = load_config(str(tmp_path / "config.yaml"))
    prep = prepare(params)
    example = prep.data.train[0]
    pairs = zip(example.input_ids, example.labels, strict=True)
    trained = prep.tokenizer.decode([token for token, label in pairs if label != -100])
    assert prep.tokenizer.decode(example.input_ids).startswith("[user] Say 0\n[assistant] 0!")
    assert trained == "0!</s>\n"

    assert main(["--config", str(tmp_path / "config.yaml")]) == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "run").chat_template == OWN

    path = tmp_path / "mine.jinja"
    path.write_text(OWN)
    first = prepare(dataclasses.replace(params, chat_template=str(path), project_name=str(tmp_path / "again")))
    path.write_text(OWN.replace("'[' + m['role']", "'<' + m['role']"))
    edited = prepare(dataclasses.replace(params, chat_template=str(path), project_name=str(tmp_path / "again")))
    assert not edited.prepared.hit and edited.prepared.key != first.prepared.key
    assert edited.tokenizer.decode(edited.data.train[0].input_ids).startswith("<user] Say 0\n<assistant] 0!")


# ---- tool calls (sft and default)

TOOL_TEMPLATE = (
    "{% if tools %}{{ '<tools>' + (tools | tojson) + '</tools>\\n' }}{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' and m.tool_calls is defined and m.tool_calls %}{{ '[assistant] ' }}"
    "{% for c in m.tool_calls %}{{ '<call>' + c.function.name + ' ' + (c.function.arguments | tojson) + '</call>' }}"
    "{% endfor %}{{ eos_token + '\\n' }}"
    "{% elif m.role == 'assistant' %}{{ '[assistant] ' + m.content + eos_token + '\\n' }}"
    "{% else %}{{ '[' + m.role + '] ' + m.content + '\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}"
)
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}


def _tool_rows(path, legacy: bool = False):
    import json

    call = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    calling = {"role": "assistant", "content": None}
    calling.update(
        {"function_call": call} if legacy else {"tool_calls": [{"id": "c1", "type": "function", "function": call}]}
    )
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        calling,
        {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "18 C, sunny"},
        {"role": "assistant", "content": "It is 18 C and sunny."},
    ]
    path.write_text("".join(json.dumps({"messages": messages, "tools": [WEATHER]}) + "\n" for _ in range(4)))
    return path


@pytest.mark.parametrize("legacy", [False, True], ids=["tool_calls", "function_call"])
def test_tool_calls_are_trained_as_the_template_writes_them(tiny_llama, tmp_path, legacy):
    """The calls (arguments as an object, as model templates write them with tojson) and the final answer carry the
    loss; the user turn, the tool's result and the tool definitions (given to the template) do not."""
    from tunelab.cli import main
    from tunelab.config.llm import LLMParams
    from tunelab.tasks.llm import prepare

    data = _tool_rows(tmp_path / "tools.jsonl", legacy)
    template = tmp_path / "tools.jinja"
    template.write_text(TOOL_TEMPLATE)
    settings = {"trainer": "sft", "chat_template": str(template), "block_size": 256, "text_column": "messages"}
    prep = prepare(LLMParams(model=str(tiny_llama), data_path=str(data), project_name=str(tmp_path / "r"), **settings))
    example = prep.data.train[0]
    text = prep.tokenizer.decode(example.input_ids)
    pairs = zip(example.input_ids, example.labels, strict=True)
    trained = prep.tokenizer.decode([token for token, label in pairs if label != -100])
    assert text.startswith('<tools>[{"type": "function", "function": {"name": "get_weather"')
    assert '[assistant] <call>get_weather {"city": "Paris"}</call></s>\n[tool] 18 C, sunny\n' in text
    assert trained.startswith('<call>get_weather {"city": "Paris"}</call></s>\n')  # the call, then the answer:
    assert trained.endswith("It is 18 C and sunny.</s>\n") and "sunny\n" not in trained  # not the tool's result
    assert "Weather in Paris" not in trained and "<tools>" not in trained

    args = ["llm", "--train", "--model", str(tiny_llama), "--data-path", str(data), "--trainer", "sft"]
    args += ["--chat-template", str(template), "--text-column", "messages", "--max-steps", "2", "--batch-size", "2"]
    assert main([*args, "--block-size", "256", "--project-name", str(tmp_path / "run")]) == 0


def test_a_tools_column_the_template_leaves_out_is_a_bad_row(tiny_llama, tmp_path, capsys):
    from tunelab.cli import main

    data = _tool_rows(tmp_path / "tools.jsonl")
    plain = tmp_path / "plain.jinja"  # writes the calls, not the definitions
    plain.write_text(TOOL_TEMPLATE.replace("{% if tools %}", "{% if false %}"))
    args = ["llm", "--dry-run", "--model", str(tiny_llama), "--data-path", str(data), "--trainer", "sft"]
    assert main([*args, "--text-column", "messages", "--chat-template", str(plain), "--block-size", "256"]) == 2
    err = capsys.readouterr().err
    assert f"{data} line 1, column 'tools': the chat template does not write its tools" in err


def test_tunelab_s_chatml_writes_tool_use_as_qwen2_5_does(tiny_tokenizer):
    """ChatML's tool use in the Hermes form of Qwen2.5's own template: definitions in the system turn, each call a
    JSON object in <tool_call>, results in a user turn in <tool_response>; the calls carry the loss."""
    from tunelab.data.formats import convert_row

    row = json.loads(_tool_rows(Path(tempfile.mkdtemp()) / "t.jsonl").read_text().splitlines()[0])
    example = convert_row(row, RowFormat("messages", {"messages": "messages"}))
    messages = [{"role": "system", "content": "Be brief."}, *example["messages"]]
    rendered = render_messages(messages, template_source("chatml", tiny_tokenizer), tiny_tokenizer, example["tools"])
    assert rendered.text == (
        "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to assist with the user query."
        "\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + json.dumps(WEATHER)
        + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
        '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
        "</tool_call><|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        "<|im_end|>\n<|im_start|>user\n<tool_response>\n18 C, sunny\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nIt is 18 C and sunny.<|im_end|>\n"
    )
    assert [rendered.text[a:b] for a, b in rendered.spans] == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n',
        "It is 18 C and sunny.<|im_end|>\n",
    ]


def test_mask_history_trains_the_last_answer_only(tiny_llama, tmp_path):
    """Multi-turn chats: by default every assistant answer carries the loss; with mask_history only the last one,
    the earlier turns being its context."""
    from tunelab.config.llm import LLMParams
    from tunelab.tasks.llm import prepare

    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"messages": CONVERSATION}) + "\n")

    def trained(**extra) -> str:
        values = {"trainer": "sft", "text_column": "messages", "chat_template": "chatml", "block_size": 128, **extra}
        prep = prepare(
            LLMParams(model=str(tiny_llama), data_path=str(data), project_name=str(tmp_path / "r"), **values)
        )
        example = prep.data.train[0]
        pairs = zip(example.input_ids, example.labels, strict=True)
        return prep.tokenizer.decode([token for token, label in pairs if label != -100])

    assert trained().replace(" ", "") == "Hello!<|im_end|>\nFine.<|im_end|>\n".replace(" ", "")
    assert trained(mask_history=True).strip() == "Fine.<|im_end|>"


def test_a_tool_call_a_template_rewrites_in_later_turns_is_a_bad_row_not_an_untrained_one(
    tiny_llama, tmp_path, capsys
):
    """A template that writes earlier assistant turns otherwise than the last (Qwen3 drops their reasoning): the
    answers are then found by their content, and a call's turn has none; it must not train with no loss."""
    from tunelab.cli import main

    rewrites = TOOL_TEMPLATE.replace(
        "{% if m.role == 'assistant' and", "{% if m.role == 'assistant' and loop.last and"
    )
    template = tmp_path / "rewrites.jinja"
    template.write_text(rewrites)
    data = _tool_rows(tmp_path / "tools.jsonl")
    args = ["llm", "--dry-run", "--model", str(tiny_llama), "--data-path", str(data), "--trainer", "sft"]
    assert main([*args, "--text-column", "messages", "--chat-template", str(template), "--block-size", "256"]) == 2
    assert "a tool call's place in the text cannot be found" in capsys.readouterr().err


def test_a_conversation_opened_by_a_tool_call_trains_the_call(tiny_tokenizer):
    """An agent's logged turns may open with the assistant's call (no user turn kept): its place is found by
    rendering before it, as for any later turn (a call has no content to be found by; it was a bad row)."""
    from tunelab.data.formats import convert_row

    row = json.loads(_tool_rows(Path(tempfile.mkdtemp()) / "t.jsonl").read_text().splitlines()[0])
    messages = convert_row(row, RowFormat("messages", {"messages": "messages"}))["messages"][1:]
    rendered = render_messages(messages, template_source("chatml", tiny_tokenizer), tiny_tokenizer, [WEATHER])
    assert [rendered.text[a:b] for a, b in rendered.spans] == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n',
        "It is 18 C and sunny.<|im_end|>\n",
    ]


def test_older_tool_shapes_and_struct_nulls_are_read():
    """OpenAI's older `function` role and null arguments; a Parquet struct's nulls for other rows' keys dropped."""
    from tunelab.data.formats import cell_messages, cell_tools

    row = {
        "messages": [
            {"role": "user", "content": "Time?"},
            {"role": "assistant", "content": None, "function_call": {"name": "now", "arguments": None}},
            {"role": "function", "name": "now", "content": "9:00"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris", "tz": None}}}],
            },
        ],
        "tools": [{"type": "function", "function": {"name": "now", "description": None, "parameters": None}}],
    }
    messages = cell_messages(row, "messages", tool_calls=True)
    assert messages[1]["tool_calls"][0]["function"] == {"name": "now", "arguments": {}}
    assert messages[2] == {"role": "tool", "content": "9:00", "name": "now"}
    assert messages[3]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert cell_tools(row, "tools") == [{"type": "function", "function": {"name": "now"}}]
    bare = {"tools": [{"name": "now", "parameters": {"type": "object"}}]}  # glaive/xLAM's form: wrapped as served
    assert cell_tools(bare, "tools") == [{"type": "function", "function": bare["tools"][0]}]


def test_evaluate_measures_a_mask_history_run_on_its_last_answers(tiny_llama, tmp_path):
    """evaluate's loss is the training loss's counterpart: on the answers the run trained, the last ones here."""
    import tunelab
    from tunelab.config.llm import LLMParams
    from tunelab.data import load_data
    from tunelab.inference.evaluate import evaluate_run, mean_loss
    from tunelab.inference.generate import load_run

    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": CONVERSATION}) + "\n" for _ in range(4)))
    settings = {"text_column": "messages", "chat_template": "chatml", "block_size": 128}
    out = tunelab.train(
        model=str(tiny_llama), data_path=str(data), trainer="sft", mask_history=True, max_steps=1, batch_size=2,
        project_name=str(tmp_path / "run"), **settings,
    )  # fmt: skip
    results = evaluate_run(out, str(data), split="test", samples=0)
    model, tokenizer = load_run(out)

    def loss(mask_history: bool) -> float:
        params = LLMParams(model=str(out), data_path=str(data), mask_history=mask_history, **settings)
        return mean_loss(model, list(load_data(params, tokenizer).train))

    assert results["eval_loss"] == pytest.approx(loss(True), rel=1e-6) and loss(True) != pytest.approx(loss(False))


# ---- reasoning (thinking) traces

# Qwen3's way, cut down: an assistant turn after the last user turn writes its reasoning_content in a think block.
READS_REASONING = (
    "{% for m in messages %}"
    "{% if m.role == 'assistant' %}{{ '[assistant] ' }}"
    "{% if loop.last and m.reasoning_content is defined %}"
    "{{ '<think>\\n' + m.reasoning_content.strip('\\n') + '\\n</think>\\n\\n' }}{% endif %}"
    "{{ m.content + eos_token + '\\n' }}"
    "{% else %}{{ '[' + m.role + '] ' + m.content + '\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}"
)


@pytest.mark.parametrize("key", ["reasoning_content", "reasoning", "thinking"])
def test_reasoning_is_trained_in_a_think_block_before_the_answer(tiny_tokenizer, key):
    """DeepSeek's and Qwen3's reasoning_content, OpenRouter's and vLLM's reasoning, gpt-oss's thinking: kept, and
    for a template that writes no reasoning (tunelab's chatml) written into the answer as those models write it,
    inside the trained span; an earlier turn's reasoning too."""
    from tunelab.data.formats import cell_messages

    row = {
        "messages": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", key: "Two and two make four."},
            {"role": "user", "content": "3+3?"},
            {"role": "assistant", "content": "\n6", key: "\nThree and three.\n"},
        ]
    }
    messages = cell_messages(row, "messages", tool_calls=True)
    assert messages[1] == {"role": "assistant", "content": "4", "reasoning_content": "Two and two make four."}
    rendered = render_messages(messages, template_source("chatml", tiny_tokenizer), tiny_tokenizer)
    assert [rendered.text[a:b] for a, b in rendered.spans] == [
        "<think>\nTwo and two make four.\n</think>\n\n4<|im_end|>\n",
        "<think>\nThree and three.\n</think>\n\n6<|im_end|>\n",
    ]


def test_a_split_whose_answers_reason_is_told_apart():
    """What makes a run's record say it learned to reason (and its Ollama export a thinking model): an answer with
    reasoning, in a message list or a JSON string of one (ShareGPT's too); not an empty one, not a user's, not in
    a column that is not a conversation."""
    from tunelab.data.formats import holds_reasoning
    from tunelab.data.sources import Split

    def rows(*messages: dict) -> Split:
        return Split("train", "t.jsonl", [{"messages": [{"role": "user", "content": "2+2?"}, *messages]}])

    assert holds_reasoning(rows({"role": "assistant", "content": "4", "thinking": "Two and two."}), ["messages"])
    as_text = [{"role": "assistant", "content": "4", "reasoning_content": "Two and two."}]
    assert holds_reasoning(Split("train", "t.csv", [{"m": "x"}, {"m": json.dumps(as_text)}]), ["m"])
    assert holds_reasoning(rows({"from": "GPT", "value": "4", "reasoning": "Two and two."}), ["messages"])
    inline = {"role": "assistant", "content": "\n<think>\nTwo and two.\n</think>\n\n4"}  # OpenThoughts' form
    assert holds_reasoning(rows(inline), ["messages"])
    assert not holds_reasoning(rows({"role": "assistant", "content": "4"}), ["messages"])
    assert not holds_reasoning(rows({"role": "assistant", "content": "4", "reasoning": " "}), ["messages"])
    assert not holds_reasoning(rows({"role": "user", "content": "4", "reasoning": "mine"}), ["messages"])
    assert not holds_reasoning(rows({"role": "assistant", "content": "4", "thinking": "x"}), ["other"])


def test_reasoning_goes_where_a_template_reads_it(tiny_tokenizer):
    """A template that reads reasoning_content (Qwen3's) gets it there, and writes it its own way: here only in the
    last turn, so the earlier turn trains on its answer alone, as the template shows it."""
    from tunelab.data.templates import reasoning_key

    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Two and two."},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6", "reasoning_content": "Three and three."},
    ]
    rendered = render_messages(messages, READS_REASONING, tiny_tokenizer)
    assert rendered.text == (
        "[user] 2+2?\n[assistant] 4</s>\n[user] 3+3?\n[assistant] <think>\nThree and three.\n</think>\n\n6</s>\n"
    )
    assert [rendered.text[a:b] for a, b in rendered.spans] == [
        "4</s>",  # found by its content (the template writes this turn otherwise when it is the last)
        "<think>\nThree and three.\n</think>\n\n6</s>\n",
    ]
    assert reasoning_key(READS_REASONING) == "reasoning_content"
    assert reasoning_key("{{ message.thinking }}") == "thinking" and reasoning_key("{{ enable_thinking }}") is None
    assert reasoning_key("{% set r = m['reasoning_content'] %}{{ r }}") == "reasoning_content"
    refuses = "{% if m.reasoning_content %}{{ raise_exception('no reasoning_content') }}{% endif %}"
    assert reasoning_key(refuses) == "reasoning_content"  # it reads the key, to refuse it
    named = "{# reasoning_content is dropped #}{{ raise_exception('reasoning_content is not supported') }}"
    assert reasoning_key(named) is None  # named in a comment and a text, never read
    gemma = "{{ message.get('reasoning') or message.get('reasoning_content') }}"  # Gemma 4's read
    assert reasoning_key(gemma) == "reasoning_content"
    blocks = "{% for m in messages %}{% for block in m.content %}{{ block['thinking'] }}{% endfor %}{% endfor %}"
    assert reasoning_key(blocks) is None  # Mistral's content blocks: a block's thinking, not the message's
    assert reasoning_key("{{ m['content'][0].thinking }}") is None
    assert reasoning_key("{{ message.reasoning_content ") == "reasoning_content"  # does not parse: read as text


@pytest.mark.parametrize(
    "message, problem",
    [
        ({"role": "user", "content": "hi", "reasoning": "why"}, "message 1 has reasoning but role 'user'"),
        ({"role": "assistant", "content": "hi", "reasoning_content": ["a"]}, "message 1 reasoning_content is not"),
    ],
)
def test_reasoning_in_the_wrong_place_is_a_bad_row(tmp_path, message, problem):
    from tunelab.data.formats import RowProblem, cell_messages

    with pytest.raises(RowProblem, match=problem):
        cell_messages({"messages": [message, {"role": "assistant", "content": "ok"}]}, "messages")


def test_a_preference_pair_trains_its_reasoning(tiny_llama, tmp_path):
    """Chosen and rejected answers that reason (DPO on a reasoning model's answers) carry it into the pair's
    answer tokens."""
    from tunelab.config.llm import LLMParams
    from tunelab.tasks.llm import prepare

    row = {
        "prompt": [{"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "assistant", "content": "4", "reasoning_content": "Two and two make four."}],
        "rejected": [{"role": "assistant", "content": "5", "reasoning_content": "Two and two make five."}],
    }
    data = tmp_path / "pairs.jsonl"
    data.write_text((json.dumps(row) + "\n") * 4)
    settings = {"trainer": "dpo", "chat_template": "chatml", "block_size": 128, "project_name": str(tmp_path / "r")}
    prep = prepare(LLMParams(model=str(tiny_llama), data_path=str(data), **settings))
    pair = prep.data.train[0]
    answers = [prep.tokenizer.decode(ids) for ids in (pair.chosen_ids, pair.rejected_ids)]
    assert answers[0].startswith("<think>\nTwo and two make four.\n</think>\n\n4")
    assert answers[1].startswith("<think>\nTwo and two make five.\n</think>\n\n5")
    assert prep.data.reasoning  # the run's record says so: its Ollama export is a thinking model


def test_a_template_that_cuts_the_reasoning_out_is_a_bad_row(tiny_llama, tmp_path, capsys):
    """DeepSeek-R1's and QwQ's templates cut every answer at </think>: the reasoning would be dropped, and the
    answer found nowhere in the text. Said as a bad row, with the templates that write it, not trained without."""
    from tunelab.cli import main

    cuts = tmp_path / "r1.jinja"
    cuts.write_text(
        "{% for m in messages %}{% set c = m.content %}{% if m.role == 'assistant' and '</think>' in c %}"
        "{% set c = c.split('</think>')[-1].lstrip() %}{% endif %}{{ '[' + m.role + '] ' + c + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '[assistant] <think>\\n' }}{% endif %}"
    )
    chat = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning": "Two and two."}]
    data = tmp_path / "r.jsonl"
    data.write_text((json.dumps({"messages": chat}) + "\n") * 3)
    args = ["llm", "--dry-run", "--model", str(tiny_llama), "--data-path", str(data), "--trainer", "sft"]
    assert main([*args, "--chat-template", str(cuts), "--block-size", "128"]) == 2
    err = capsys.readouterr().err
    assert f"{data} line 1, column 'messages': the chat template does not write its reasoning" in err
    assert "use a template that does (chatml" in err and "Traceback" not in err
    assert main([*args, "--chat-template", "chatml", "--block-size", "128"]) == 0


# ---- chat_template_kwargs

SWITCHED = (  # SmolLM3's way, cut down: enable_thinking picks a system flag
    "{{ '[system] ' + ('/think' if enable_thinking is not defined or enable_thinking else '/no_think') + '\\n' }}"
    "{% for m in messages %}{{ '[' + m.role + '] ' + m.content }}{% if m.role == 'assistant' %}{{ eos_token }}"
    "{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}"
)


def test_chat_template_kwargs_render_the_data_and_stay_the_run_s_defaults(tiny_llama, tmp_path, capsys):
    """`--chat-template-kwargs '{"enable_thinking": false}'` (TRL's and vLLM's name): the data is rendered with
    it, the prepared data is another, and the run's saved template keeps it as its default, which a caller's own
    value still overrides; a config file gives it as an object; what is not a template variable is one line."""
    import yaml
    from transformers import AutoTokenizer

    from tunelab.cli import main
    from tunelab.config import load_config
    from tunelab.config.llm import LLMParams
    from tunelab.tasks.llm import prepare

    template = tmp_path / "switched.jinja"
    template.write_text(SWITCHED)
    data = tmp_path / "chat.jsonl"
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    data.write_text((json.dumps({"messages": chat}) + "\n") * 8)
    settings = {"trainer": "sft", "chat_template": str(template), "block_size": 64, "max_steps": 1}
    base = LLMParams(model=str(tiny_llama), data_path=str(data), project_name=str(tmp_path / "p"), **settings)
    plain = prepare(base)
    off = prepare(LLMParams(**{**base.to_dict(redact=False), "chat_template_kwargs": '{"enable_thinking": false}'}))
    assert plain.tokenizer.decode(plain.data.train[0].input_ids).startswith("[system] /think\n[user] Hi")
    assert off.tokenizer.decode(off.data.train[0].input_ids).startswith("[system] /no_think\n[user] Hi")
    assert off.prepared.key != plain.prepared.key

    args = ["llm", "--train", "--model", str(tiny_llama), "--data-path", str(data), "--trainer", "sft"]
    args += ["--chat-template", str(template), "--block-size", "64", "--max-steps", "1"]
    assert (
        main([*args, "--chat-template-kwargs", '{"enable_thinking": false}', "--project-name", str(tmp_path / "r")])
        == 0
    )
    saved = AutoTokenizer.from_pretrained(tmp_path / "r")
    prompt = [{"role": "user", "content": "Hi"}]
    assert saved.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True).startswith(
        "[system] /no_think"
    )
    overridden = saved.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert overridden.startswith("[system] /think")

    config = {
        "task": "llm-sft", "base_model": str(tiny_llama), "project_name": str(tmp_path / "c"),
        "data": {"path": str(data), "chat_template": str(template), "column_mapping": {"text_column": "messages"}},
        "params": {"chat_template_kwargs": {"enable_thinking": False}},
    }  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert load_config(str(tmp_path / "config.yaml")).chat_template_kwargs == {"enable_thinking": False}

    refused = {
        '{"messages": 1}': "messages is not a template variable",
        "[1]": "must be an object",
        '{"enable_thinkng": false}': "the chat template (" + str(template) + ") never reads enable_thinkng",
        '{"enable_thinking": NaN}': "must be true/false, a finite number or text",
    }
    for value, message in refused.items():
        assert main([*args, "--dry-run", "--chat-template-kwargs", value]) == 2
        assert message in capsys.readouterr().err


def test_evaluate_asks_its_sample_prompts_with_the_conversation_s_tools(tiny_llama, tmp_path):
    """The sample answers of a tool-calling run are asked with the tool definitions the conversation was trained
    with: a template that will not write a turn without them (as some models' templates expect them) answers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.config.llm import LLMParams
    from tunelab.inference.evaluate import _answer, _prompts

    data = _tool_rows(tmp_path / "tools.jsonl")
    settings = {"trainer": "sft", "chat_template": "chatml", "block_size": 256, "text_column": "messages"}
    params = LLMParams(model=str(tiny_llama), data_path=str(data), project_name=str(tmp_path / "r"), **settings)
    (prompt, reference, tools), *_ = _prompts(params, 1)
    assert reference == "It is 18 C and sunny." and tools == [WEATHER]
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.chat_template = "{% if not tools %}{{ raise_exception('no tools given') }}{% endif %}" + TOOL_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    assert isinstance(_answer(model, tokenizer, prompt, 4, tools=tools), str)
    with pytest.raises(Exception, match="no tools given"):
        _answer(model, tokenizer, prompt, 4)
