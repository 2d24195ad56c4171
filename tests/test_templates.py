"""Every chat template's exact text for a two-turn conversation, and the assistant spans it marks."""

from __future__ import annotations

import pytest

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
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nHow are you?\n\n### Response:\nFine.</s>"
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
