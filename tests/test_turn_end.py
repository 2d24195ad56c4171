"""Generation ends where the chat template ends a turn (models/turns.py), not only at the model's EOS.

The tiny Llama's tokenizer ends sequences with `</s>` and turns with ChatML's `<|im_end|>` (as Qwen2.5's base model
does with `<|endoftext|>`): a model fine-tuned on chats learns to close its answer with `<|im_end|>`, and
generating until `</s>` ran on into an invented next turn in chat, generate and serve.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from tests.conftest import CHATML, build_tokenizer, learn_by_heart
from tests.test_serve import openai, running
from tunelab.inference.chat import ChatSession
from tunelab.inference.generate import GenerationParams, generate, load_run
from tunelab.models.turns import turn_end, turn_end_marker

ANSWER = "Hello friend, how are you"
# A template whose turn end is plain text, several tokens long: generation stops at its text instead.
TEXT_MARKER = (
    "{% for m in messages %}{{ m['role'] + ':\\n' + m['content'] + '\\n[END]\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:\\n' }}{% endif %}"
)


def _taught_run(tiny_llama: Path, folder: Path, template: str) -> Path:
    """A run that learned one answer to "Hi", closed by the template's turn end."""
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ANSWER}]
    data = folder / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": chat}) + "\n" for _ in range(16)), encoding="utf-8")
    model = folder / "base"
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.chat_template = template
    base.save_pretrained(model)
    tokenizer.save_pretrained(model)
    return learn_by_heart(model, data, folder / "run", "tokenizer", block_size=64)


@pytest.fixture(scope="module", params=["special token", "text"])
def taught(request, tiny_llama, tmp_path_factory) -> tuple[str, Path]:
    template = CHATML if request.param == "special token" else TEXT_MARKER
    return request.param, _taught_run(tiny_llama, tmp_path_factory.mktemp("turn-end"), template)


def test_the_marker_is_read_from_the_template(tmp_path):
    tokenizer = build_tokenizer(tmp_path)  # its own: the template is changed below
    assert turn_end_marker(tokenizer) == "<|im_end|>"
    ids, strings = turn_end(tokenizer)
    assert ids == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")] and strings == []
    alpaca = (Path(__file__).resolve().parents[1] / "src/tunelab/data/templates/alpaca.jinja").read_text()
    for source, marker in [(alpaca, "</s>"), (TEXT_MARKER, "[END]"), (None, None)]:
        tokenizer.chat_template = source
        assert turn_end_marker(tokenizer) == marker
    tokenizer.chat_template = TEXT_MARKER
    assert turn_end(tokenizer) == ([tokenizer.eos_token_id], ["[END]"])  # several tokens: a stop string
    tokenizer.chat_template = "{{ raise_exception('no') }}"
    assert turn_end_marker(tokenizer) is None


def test_chat_generate_and_serve_stop_at_the_turn_end(taught):
    kind, run = taught
    model, tokenizer = load_run(run)
    # As an adapter's base model would: its generation config knows only the EOS (the tokenizer's template is
    # what tells tunelab where a turn ends).
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    # The model did learn to close its answer with the marker and would run on past it to the EOS: the
    # generation that stops only at `</s>` goes on into another turn.
    hi = [{"role": "user", "content": "Hi"}]
    prompt = tokenizer.apply_chat_template(hi, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        plain = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    ran_on = tokenizer.decode(plain[0, ids.shape[1] :], skip_special_tokens=False)
    marker = turn_end_marker(tokenizer)
    assert ran_on.startswith(ANSWER) and marker in ran_on and len(ran_on) > len(ANSWER) + len(marker) + 2, ran_on

    assert generate(model, tokenizer, "Hi", GenerationParams(max_new_tokens=24)) == [ANSWER]
    assert ChatSession(model, tokenizer, GenerationParams(max_new_tokens=24)).send("Hi") == ANSWER

    from tunelab.inference.openai_api import create_app
    from tunelab.inference.openai_requests import Sampling
    from tunelab.inference.streaming import Generation

    generation = Generation(model, tokenizer, threading.Lock(), ids, Sampling(max_tokens=24, temperature=0))
    assert "".join(generation).strip() == ANSWER and generation.finish_reason == "stop"
    answer_tokens = len(tokenizer(ANSWER, add_special_tokens=False)["input_ids"])
    if kind == "special token":  # the answer's tokens and the marker's
        assert generation.completion_tokens == answer_tokens + 1
    else:  # the returned text's tokens ("[END]" cut off)
        assert generation.completion_tokens == len(tokenizer(ANSWER + "\n", add_special_tokens=False)["input_ids"])
    with running(create_app(model, tokenizer, "taught")) as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=30)
        whole = client.chat.completions.create(model="taught", messages=hi, max_tokens=24, temperature=0)
    assert whole.choices[0].message.content.strip() == ANSWER and whole.choices[0].finish_reason == "stop"


def test_a_full_model_carries_the_turn_end_in_its_generation_config(taught):
    kind, run = taught
    tokenizer = AutoTokenizer.from_pretrained(run)
    config = GenerationConfig.from_pretrained(run)
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    if kind == "special token":  # transformers' own generate, vLLM and TGI stop there too
        assert eos == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    else:  # text of several tokens cannot be written there
        assert eos == [tokenizer.eos_token_id]


def test_generate_answers_a_file_of_prompts_in_batches(taught, tmp_path):
    """`tunelab generate --data-path`: every prompt answered, in left-padded batches (a short prompt padded beside a
    long one gets the answer it gets alone), each ended at the turn end, written as JSON lines in the file's order."""
    from tunelab.cli import main

    _, run = taught
    rows = [
        {"prompt": "Hi"},
        {"prompt": "Hi, and what do you know about the weather in Paris today?"},
        {"prompt": "Hi"},
    ]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "answers.jsonl"
    args = ["generate", "--model", str(run), "--data-path", str(prompts), "--output", str(out)]
    assert main([*args, "--batch-size", "2", "--max-new-tokens", "24"]) == 0
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [w["prompt"] for w in written] == [r["prompt"] for r in rows]
    assert written[0]["answer"] == written[2]["answer"] == ANSWER  # padded in a batch of two, then alone
    assert "<|im_end|>" not in written[1]["answer"] and "[END]" not in written[1]["answer"]
    assert main(["generate", "--model", str(run)]) == 2  # neither a prompt nor a file
    assert main([*args[:-1], str(tmp_path / "no-such-folder" / "a.jsonl")]) == 2  # said before the model loads


def test_generate_answers_a_file_of_conversations(taught, tmp_path):
    """`tunelab generate --data-path` on a column of conversations: each written by the run's template and
    answered as its next turn; one that ends with an answer (a held-out chat) is asked from before it, the answer
    kept as its reference. A plain-text prompt beside them is a user turn, as always."""
    from tunelab.cli import main

    _, run = taught
    hi = [{"role": "user", "content": "Hi"}]
    rows = [{"messages": hi}, {"messages": [*hi, {"role": "assistant", "content": "Hey."}]}, {"messages": "Hi"}]
    prompts = tmp_path / "chats.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "answers.jsonl"
    args = ["generate", "--model", str(run), "--data-path", str(prompts), "--text-column", "messages"]
    assert main([*args, "--output", str(out), "--max-new-tokens", "24"]) == 0
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [w["answer"] for w in written] == [ANSWER] * 3
    assert [w["prompt"] for w in written] == [hi, hi, "Hi"]
    assert [w.get("reference") for w in written] == [None, "Hey.", None]
