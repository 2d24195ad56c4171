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
    with pytest.raises(ConfigError, match="unknown chat template 'llama9'"):
        template_source("llama9", tiny_tokenizer)


def test_tokenizer_template_missing_is_a_clear_error(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    with pytest.raises(ConfigError, match="has no chat template"):
        template_source("tokenizer", tok)
