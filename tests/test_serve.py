"""`tunelab serve`: the real server (uvicorn in a thread) answering the official `openai` client."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tunelab.errors import TunelabError
from tunelab.inference.serve import serve

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

HELLO = [{"role": "user", "content": "Give me three tips for staying focused."}]


@contextmanager
def running(app) -> Iterator[int]:
    """Run `app` with uvicorn on a free local port (port 0: the OS picks) and yield the port."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def loaded(tiny_llama):
    from tunelab.inference.generate import load_run

    return load_run(tiny_llama)


@pytest.fixture(scope="module")
def client(loaded) -> Iterator:
    from tunelab.inference.openai_api import create_app

    with running(create_app(*loaded, model_name="tiny")) as port:
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=30)


def test_models_list(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_chat_greedy_streaming_matches_whole(client):
    whole = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0)
    choice = whole.choices[0]
    assert whole.object == "chat.completion" and whole.model == "tiny"
    assert isinstance(choice.message.content, str) and choice.message.role == "assistant"
    assert choice.finish_reason in ("length", "stop")
    usage = whole.usage
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    if choice.finish_reason == "length":
        assert usage.completion_tokens == 8

    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=HELLO,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [choice.finish_reason]
    assert chunks[-1].usage.total_tokens == usage.total_tokens


def test_completions_streaming_and_whole(client):
    whole = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0)
    assert whole.object == "text_completion" and isinstance(whole.choices[0].text, str)
    assert whole.choices[0].finish_reason in ("length", "stop")
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    stream = client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == whole.choices[0].text


def _direct_logprobs(loaded, ids):
    """log p of each of ids[1:] given those before it, from the model itself."""
    import torch

    model = loaded[0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids], device=model.device)).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def test_an_echoed_prompt_is_scored_as_lm_evaluation_harness_asks(client, loaded):
    """lm-evaluation-harness's local-completions scores a continuation with echo, logprobs 1 and token ids: each
    token's log-prob is the model's own (checked against a forward pass here), the first None; max_tokens 0
    scores the prompt alone."""
    tokenizer = loaded[1]
    ids = tokenizer("Once upon a time there was", add_special_tokens=False)["input_ids"]
    expected = _direct_logprobs(loaded, ids)
    scored = client.completions.create(model="tiny", prompt=[ids], echo=True, logprobs=1, max_tokens=0)
    found = scored.choices[0]
    assert found.text == tokenizer.decode(ids) and found.finish_reason == "length"
    assert found.logprobs.token_logprobs[0] is None and found.logprobs.top_logprobs[0] is None
    assert found.logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert "".join(found.logprobs.tokens) == found.text
    assert found.logprobs.text_offset[:3] == [
        0,
        len(found.logprobs.tokens[0]),
        len("".join(found.logprobs.tokens[:2])),
    ]
    for place in found.logprobs.top_logprobs[1:]:  # logprobs 1: the likeliest token there
        assert len(place) == 1

    # a string prompt, one greedy token: the prompt's scores, then the token's (the likeliest, so its top one)
    text = tokenizer.decode(ids)
    both = client.completions.create(model="tiny", prompt=text, echo=True, logprobs=1, max_tokens=1, temperature=0)
    found = both.choices[0].logprobs
    assert found.token_logprobs[1 : len(ids)] == pytest.approx(expected, abs=1e-4)
    assert len(found.tokens) == len(ids) + 1 and both.choices[0].text.startswith(text)
    assert list(found.top_logprobs[-1].values()) == pytest.approx([found.token_logprobs[-1]], abs=1e-5)


def test_chat_logprobs_are_the_answer_tokens_own(client, loaded):
    answer = client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content, ended = answer.choices[0].logprobs.content, answer.choices[0].finish_reason == "stop"
    joined = b"".join(bytes(t.bytes) for t in content)  # a character split over tokens: in each one's bytes
    assert joined.decode("utf-8", errors="replace") == answer.choices[0].message.content
    assert len(content) == answer.usage.completion_tokens - ended  # the end token is not the answer's
    for token in content:  # greedy: each token is the likeliest there
        assert len(token.top_logprobs) == 3 and token.top_logprobs[0].logprob == pytest.approx(token.logprob)
        assert bytes(token.bytes).decode("utf-8", errors="replace") == token.token
    # the first token, the likeliest after the prompt: its log-prob from a forward pass over the prompt
    import torch

    model, tokenizer = loaded
    text = tokenizer.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        first = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1).max().item()
    assert content[0].logprob == pytest.approx(first, abs=1e-4)


def test_streamed_logprobs_are_the_whole_answer_s(client):
    """Streamed, the log-probs come in one chunk after the answer's text (scored once it is whole): joined over the
    chunks, the same as without stream, for a chat and for a text completion."""
    asked = {"model": "tiny", "max_tokens": 6, "temperature": 0}
    chat = {"messages": HELLO, "logprobs": True, "top_logprobs": 2}
    whole = client.chat.completions.create(**asked, **chat).choices[0].logprobs.content
    chunks = [c.choices[0] for c in client.chat.completions.create(**asked, **chat, stream=True) if c.choices]
    streamed = [token for c in chunks if c.logprobs for token in c.logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, pytest.approx(t.logprob, abs=1e-5)) for t in whole]
    assert [len(t.top_logprobs) for t in streamed] == [2] * len(whole)
    assert not any(c.logprobs for c in chunks if c.delta.content)  # after the text, not beside it

    text = {"prompt": "Once upon a time", "logprobs": 2}
    whole = client.completions.create(**asked, **text).choices[0].logprobs
    chunks = [c.choices[0] for c in client.completions.create(**asked, **text, stream=True)]
    (scored,) = [c.logprobs for c in chunks if c.logprobs]
    assert scored.tokens == whole.tokens and scored.token_logprobs == pytest.approx(whole.token_logprobs, abs=1e-5)


def test_stop_string_cuts_the_answer(client):
    whole = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0)
    text = whole.choices[0].text
    if len(text.strip()) < 2:
        pytest.skip("the random model said too little to cut")
    stop = text.strip()[1:3]  # a piece from inside the answer
    cut = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_sampling_with_a_seed_repeats(client):
    def ask() -> str:
        answer = client.chat.completions.create(
            model="tiny", messages=HELLO, max_tokens=8, temperature=0.9, top_p=0.95, seed=7
        )
        return answer.choices[0].message.content

    assert ask() == ask()


# arguments that are JSON, but not an object
CALL_IN_A_LIST = {"type": "function", "function": {"name": "get_weather", "arguments": "[1]"}}


@pytest.mark.parametrize(
    "request_args, param",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"messages": HELLO, "n": 2}, "n"),
        ({"messages": HELLO, "temperature": 5}, "temperature"),
        ({"messages": HELLO, "max_tokens": 100_000}, "max_tokens"),
        ({"messages": HELLO, "max_completion_tokens": 100_000}, "max_completion_tokens"),
        ({"messages": [{"role": "user", "content": "word " * 600}]}, "messages"),
        ({"messages": HELLO, "frequency_penalty": 0.5}, "frequency_penalty"),
        ({"messages": HELLO, "logit_bias": {"5": 10}}, "logit_bias"),
        ({"messages": HELLO, "stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": HELLO, "top_logprobs": 2}, "top_logprobs"),
        ({"messages": HELLO, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"messages": [*HELLO, {"role": "assistant", "tool_calls": "get_weather"}]}, "messages[1].tool_calls"),
        ({"messages": [*HELLO, {"role": "assistant", "tool_calls": [{"id": "c1"}]}]}, "messages[1].tool_calls"),
        ({"messages": [*HELLO, {"role": "assistant", "tool_calls": [CALL_IN_A_LIST]}]}, "messages[1].tool_calls"),
    ],
)
def test_bad_requests_are_400(client, request_args, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", **request_args)
    assert err.value.status_code == 400 and err.value.body["param"] == param
    if "context" in err.value.body["message"]:  # what LiteLLM and LangChain look for, to trim and retry
        assert err.value.body["code"] == "context_length_exceeded"
        assert "maximum context length is 512 tokens" in err.value.body["message"]


def test_default_valued_fields_are_accepted_and_an_empty_prompt_is_400(client):
    answer = client.completions.create(
        model="tiny", prompt="Once", max_tokens=2, best_of=1, frequency_penalty=0, presence_penalty=0.0
    )
    assert answer.choices[0].finish_reason in ("length", "stop")
    with pytest.raises(openai.BadRequestError, match="empty") as err:
        client.completions.create(model="tiny", prompt="", max_tokens=2)  # the tiny tokenizer adds no BOS
    assert err.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as err:
        client.post("/chat/completions", body={"messages": HELLO, "stream": True, "stream_options": 1}, cast_to=object)
    assert err.value.body["param"] == "stream_options"
    for bad, param in (
        ({"logprobs": 6}, "logprobs"),
        ({"echo": True, "stream": True}, "echo"),
        ({"max_tokens": 0}, "max_tokens"),  # nothing to generate, and no prompt to echo
        ({"prompt": [1, 10**6]}, "prompt"),
    ):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(**({"model": "tiny", "prompt": "Once"} | bad))
        assert err.value.body["param"] == param


def test_a_stop_string_counts_the_tokens_returned(client, loaded):
    whole = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0)
    text = whole.choices[0].text
    if len(text.strip()) < 4:
        pytest.skip("the random model said too little to cut")
    stop = text.strip()[3:5]
    cut = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0, stop=stop)
    returned = cut.choices[0].text
    assert cut.usage.completion_tokens < whole.usage.completion_tokens
    tokenizer = loaded[1]
    assert cut.usage.completion_tokens == len(tokenizer(returned, add_special_tokens=False)["input_ids"])


def test_missing_messages_is_400(client):
    # The typed client insists on messages, so post the raw body.
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.post("/chat/completions", body={"model": "tiny"}, cast_to=object)


def test_api_key(loaded):
    from tunelab.inference.openai_api import create_app

    with running(create_app(*loaded, model_name="tiny", api_key="s3cret")) as port:
        url = f"http://127.0.0.1:{port}/v1"
        wrong = openai.OpenAI(base_url=url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as err:
            wrong.models.list()
        assert err.value.status_code == 401
        right = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0)
        assert right.models.list().data[0].id == "tiny"


def test_an_empty_api_key_is_refused(tiny_llama, monkeypatch):
    """An empty key (TUNELAB_API_KEY set to nothing) would let `Authorization: Bearer ` in while saying it needs the
    key: refused before the model loads."""
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: pytest.fail("served with an empty key"))
    with pytest.raises(TunelabError, match="API key is empty"):
        serve(str(tiny_llama), host="0.0.0.0", port=0, api_key="")
    monkeypatch.setenv("TUNELAB_API_KEY", "")
    from tunelab.cli import main

    assert main(["serve", "--model", str(tiny_llama), "--port", "0"]) == 2


def test_the_model_id_of_the_current_folder_is_its_name(tiny_llama, monkeypatch):
    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: apps.append(app))
    monkeypatch.chdir(tiny_llama)
    serve(".", port=0)
    assert apps[0].state.served.name == tiny_llama.name


def test_missing_or_wrong_model_folder(tmp_path):
    missing = tmp_path / "no-such-run"
    with pytest.raises(TunelabError, match="no-such-run"):
        serve(str(missing), port=0)
    empty = tmp_path / "empty-run"
    empty.mkdir()
    with pytest.raises(TunelabError, match="empty-run"):
        serve(str(empty), port=0)


def test_network_host_warns_and_never_logs_the_key(tiny_llama, monkeypatch, caplog):
    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: started.append(kwargs))
    with caplog.at_level("INFO", logger="tunelab"):
        serve(str(tiny_llama), host="0.0.0.0", port=0)
    assert started == [{"host": "0.0.0.0", "port": 0, "log_level": "info"}]
    assert "no authentication" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="tunelab"):
        serve(str(tiny_llama), host="0.0.0.0", port=0, api_key="s3cret-key")
    assert "no authentication" not in caplog.text and "s3cret-key" not in caplog.text


def test_a_client_that_hangs_up_stops_its_generation(tiny_llama):
    """A non-streamed answer is made off the event loop; when its client hangs up (its timeout, before a retry), the
    generation stops at the next token instead of running on to max_tokens for no one with the model's lock held."""
    import json
    import urllib.request

    from tunelab.inference.generate import load_run
    from tunelab.inference.openai_api import create_app

    model, tokenizer = load_run(tiny_llama)
    steps: list[float] = []

    def slow_step(module, args) -> None:  # ~20 ms a token: a whole answer takes seconds, a hang-up comes early
        steps.append(time.monotonic())
        time.sleep(0.02)

    model.register_forward_pre_hook(slow_step)
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 300, "temperature": 0}

    def post(body: dict, timeout: float) -> dict:
        request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)

    with running(create_app(model, tokenizer, model_name="tiny")) as port:
        url = f"http://127.0.0.1:{port}/v1/completions"
        whole = post(body, timeout=60)
        assert whole["choices"][0]["finish_reason"] == "length"  # left alone, this prompt runs to max_tokens
        assert len(steps) >= 300

        steps.clear()
        with pytest.raises(TimeoutError):  # the client gives up and closes its connection
            post(body, timeout=0.5)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not steps or time.monotonic() - steps[-1] < 1.0):
            time.sleep(0.1)  # until the model has been idle for a second
        assert 0 < len(steps) < 150, f"{len(steps)} tokens made after the client left"
        short = post(body | {"max_tokens": 2}, timeout=30)  # the lock was let go
        assert short["usage"]["completion_tokens"] == 2


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def tool_caller(tiny_llama, tmp_path_factory):
    """A run that learned to call get_weather for Paris and to answer a greeting in words, through tunelab's ChatML
    (its Hermes tool form)."""
    import json

    from tests.conftest import learn_by_heart

    folder = tmp_path_factory.mktemp("tool-caller")
    call = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    chat = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
    ]
    greeting = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi!"}]
    data = folder / "calls.jsonl"
    rows = [{"messages": chat, "tools": [WEATHER]}, {"messages": greeting, "tools": [WEATHER]}] * 8
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return learn_by_heart(tiny_llama, data, folder / "run", "chatml", block_size=512)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_model_taught_to_call_a_tool_answers_with_openai_tool_calls(tool_caller, stream):
    import json

    from tunelab.inference.generate import load_run
    from tunelab.inference.openai_api import create_app

    with running(create_app(*load_run(tool_caller), model_name="caller")) as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        asked = {"model": "caller", "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER]}
        if stream:
            chunks = list(client.chat.completions.create(**asked, temperature=0, max_tokens=64, stream=True))
            calls = [c for chunk in chunks for c in (chunk.choices[0].delta.tool_calls or [])] if chunks else []
            finish = chunks[-1].choices[0].finish_reason
        else:
            answer = client.chat.completions.create(**asked, temperature=0, max_tokens=64)
            calls, finish = answer.choices[0].message.tool_calls or [], answer.choices[0].finish_reason
        assert finish == "tool_calls"
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
            ("get_weather", {"city": "Paris"})
        ]
        assert calls[0].id.startswith("call_")

        if stream:  # log-probs of an answer that calls: in one chunk after the call, before the finish, as whole
            scored = {**asked, "temperature": 0, "max_tokens": 64, "logprobs": True, "top_logprobs": 1}
            whole = client.chat.completions.create(**scored).choices[0].logprobs.content
            chunks = [c.choices[0] for c in client.chat.completions.create(**scored, stream=True) if c.choices]
            (at,) = [i for i, c in enumerate(chunks) if c.logprobs]
            streamed = chunks[at].logprobs.content
            assert [t.token for t in streamed] == [t.token for t in whole]
            assert any(c.delta.tool_calls for c in chunks[:at]) and chunks[-1].finish_reason == "tool_calls"
            assert not any(c.delta.tool_calls for c in chunks[at:])

        # The call and its result go back as the next turn: read as training had them, answered (text or a call).
        turn = {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls]}
        result = {"role": "tool", "tool_call_id": calls[0].id, "content": "18 C, sunny"}
        followed = client.chat.completions.create(
            model="caller", messages=[*asked["messages"], turn, result], tools=[WEATHER], max_tokens=4
        )
        assert followed.choices[0].finish_reason in ("stop", "length", "tool_calls")


# A Mistral-like template (v11's call form); its call tokens are special in the tokenizer below, as in Mistral's.
MISTRAL_TEMPLATE = """{{- bos_token }}{%- if tools %}[AVAILABLE_TOOLS]{{ tools|tojson }}[/AVAILABLE_TOOLS]{%- endif %}
{%- for m in messages %}
{%- if m.role == 'user' %}[INST]{{ m.content }}[/INST]
{%- elif m.role == 'tool' %}[TOOL_RESULTS]{{ m.content }}[/TOOL_RESULTS]
{%- elif m.tool_calls %}[TOOL_CALLS]
{%- for c in m.tool_calls %}{{ c.function.name }}[ARGS]{{ c.function.arguments|tojson }}{% endfor %}{{ eos_token }}
{%- else %}{{ m.content }}{{ eos_token }}{%- endif %}
{%- endfor %}"""


@pytest.fixture(scope="module")
def mistral_caller(tiny_llama, tmp_path_factory):
    """A run that learned to call get_weather in Mistral's form, with [TOOL_CALLS] and [ARGS] special tokens."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.conftest import learn_by_heart

    folder = tmp_path_factory.mktemp("mistral-caller")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.add_tokens(["[TOOL_CALLS]", "[ARGS]"], special_tokens=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model.resize_token_embeddings(len(tokenizer))
    tokenizer.save_pretrained(folder / "base")
    model.save_pretrained(folder / "base")
    (folder / "mistral.jinja").write_text(MISTRAL_TEMPLATE)
    call = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    chat = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "tool_calls": [call]}]
    data = folder / "calls.jsonl"
    data.write_text("".join(json.dumps({"messages": chat, "tools": [WEATHER]}) + "\n" for _ in range(16)))
    return learn_by_heart(folder / "base", data, folder / "run", str(folder / "mistral.jinja"), block_size=512)


def test_a_mistral_form_call_in_special_tokens_comes_back_as_tool_calls(mistral_caller):
    import json

    from tunelab.inference.generate import load_run
    from tunelab.inference.openai_api import create_app

    model, tokenizer = load_run(mistral_caller)
    with running(create_app(model, tokenizer, model_name="caller")) as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        asked = {"model": "caller", "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER]}
        answer = client.chat.completions.create(**asked, temperature=0, max_tokens=32)
        calls = answer.choices[0].message.tool_calls or []
        assert answer.choices[0].finish_reason == "tool_calls", answer.choices[0].message.content
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
            ("get_weather", {"city": "Paris"})
        ]
        assert len(calls[0].id) == 9 and calls[0].id.isalnum()
        # Without tools the call tokens are skipped as special tokens are: what is left is text.
        plain = client.chat.completions.create(model="caller", messages=asked["messages"], max_tokens=32)
        assert "[TOOL_CALLS]" not in (plain.choices[0].message.content or "")
        # The call goes back in the next turn under Mistral's template, its id as Mistral's templates want it.
        turn = {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls]}
        result = {"role": "tool", "tool_call_id": calls[0].id, "content": "18 C, sunny"}
        followed = client.chat.completions.create(
            model="caller", messages=[*asked["messages"], turn, result], tools=[WEATHER], max_tokens=4
        )
        assert followed.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_tools_a_chat_template_does_not_write_are_refused(client):
    with pytest.raises(openai.BadRequestError, match="does not write tool definitions"):
        client.chat.completions.create(model="tiny", messages=HELLO, tools=[WEATHER], max_tokens=2)
    for choice in ("sometimes", {"type": "function", "function": {"name": "get_time"}}, "required"):
        tools = [] if choice == "required" else [WEATHER]  # a call asked for, no tools to call
        with pytest.raises(openai.BadRequestError, match="tool_choice"):
            client.chat.completions.create(model="tiny", messages=HELLO, tools=tools, tool_choice=choice)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_tool_choice_makes_the_model_call_a_tool_as_its_template_writes_one(tool_caller, stream):
    """tool_choice "required" or a tool named: the answer is begun with the call's opening as the chat template
    writes it (up to the name, or with the name, up to the arguments), and the model's continuation is read with
    it as one call; parallel_tool_calls false returns one call at most. A greeting the model answers in words is
    begun as a call too (the tiny model then writes no valid one: its answer comes back as text, opening first)."""
    import json

    from tunelab.inference.generate import load_run
    from tunelab.inference.openai_api import create_app

    named = {"type": "function", "function": {"name": "get_weather"}}
    with running(create_app(*load_run(tool_caller), model_name="caller")) as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)

        def ask(question: str, **extra):
            asked = {"model": "caller", "messages": [{"role": "user", "content": question}], "tools": [WEATHER]}
            asked |= {"temperature": 0, "max_tokens": 48, **extra}
            if not stream:
                answer = client.chat.completions.create(**asked).choices[0]
                return answer.message.tool_calls or [], answer.finish_reason, answer.message.content or ""
            chunks = list(client.chat.completions.create(**asked, stream=True))
            calls = [c for chunk in chunks for c in (chunk.choices[0].delta.tool_calls or [])]
            text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
            return calls, chunks[-1].choices[0].finish_reason, text

        for choice in ("required", named):
            calls, finish, text = ask("Weather in Paris?", tool_choice=choice, parallel_tool_calls=False)
            assert finish == "tool_calls" and len(calls) == 1, text
            assert (calls[0].function.name, json.loads(calls[0].function.arguments)) == (
                "get_weather",
                {"city": "Paris"},
            )
        assert ask("Hello there") == ([], "stop", "Hi!")
        calls, _, text = ask("Hello there", tool_choice=named)
        assert calls or text.startswith('<tool_call>\n{"name": "get_weather", "arguments":'), text


def test_a_forced_call_begins_as_each_template_writes_calls(tiny_tokenizer):
    """forced_start reads the opening of a call off the chat template itself: Hermes (chatml), Mistral's, and a
    Llama 3.1-like one."""
    import copy

    from tunelab.data.templates import template_source
    from tunelab.inference.tool_calls import forced_start

    llama = (
        "{%- if tools %}{{- tools|tojson }}{%- endif %}{%- for m in messages %}{%- if m.tool_calls %}assistant: "
        '{%- for c in m.tool_calls %}{{- \'{"name": "\' + c.function.name + \'", "parameters": \' }}'
        '{{- c.function.arguments|tojson + "}" }}{%- endfor %}{{- eos_token }}{%- else %}'
        "{{- m.role + ': ' + m.content + '\\n' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}assistant: {%- endif %}"
    )
    tokenizer, messages = copy.deepcopy(tiny_tokenizer), [{"role": "user", "content": "Hi"}]
    hermes = '<tool_call>\n{"name": "'
    for template, opening, named in (
        (template_source("chatml", tokenizer), hermes, hermes + 'f", "arguments":'),
        (MISTRAL_TEMPLATE, "[TOOL_CALLS]", "[TOOL_CALLS]f[ARGS]"),
        (llama, '{"name": "', '{"name": "f", "parameters":'),
    ):
        tokenizer.chat_template = template
        prompt = tokenizer.apply_chat_template(messages, tools=[WEATHER], tokenize=False, add_generation_prompt=True)
        assert forced_start(tokenizer, messages, [WEATHER], prompt, "") == opening
        assert forced_start(tokenizer, messages, [WEATHER], prompt, "f") == named
    tokenizer.chat_template = "{%- for m in messages %}{{ m.content }}{%- endfor %}"  # writes no calls
    assert forced_start(tokenizer, messages, [WEATHER], "Hi", "f") is None


def _read(form, text):
    import json

    content, calls = form.read(text)
    return content, [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_tool_calls_are_read_back_in_openai_s_form_and_other_text_stays_text():
    from tunelab.inference.tool_calls import HERMES

    text = 'Let me check.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
    text += '<tool_call>{"name": "b"}</tool_call>'
    assert _read(HERMES, text) == ("Let me check.", [("a", {"x": 1}), ("b", {})])
    _, calls = HERMES.read(text)
    assert len({c["id"] for c in calls}) == 2 and calls[0]["id"].startswith("call_")
    for other in ("no calls here", "<tool_call>not json</tool_call>", '<tool_call>{"arguments": {}}</tool_call>'):
        assert HERMES.read(other) == (other, [])
    # text after the calls is kept; null arguments are none (as training reads them)
    assert _read(HERMES, '<tool_call>{"name": "c", "arguments": null}</tool_call>\nDone.') == ("Done.", [("c", {})])
    # the last call left open (the model ended before closing it) is read; one cut off stays text; arguments as a
    # JSON string are read as the object they hold, anything else is no call
    assert _read(HERMES, 'Hi <tool_call>{"name": "d", "arguments": "{\\"x\\": 2}"}') == ("Hi", [("d", {"x": 2})])
    for other in ('<tool_call>{"name": "e", "argu', '<tool_call>{"name": "e", "arguments": "Paris"}</tool_call>'):
        assert HERMES.read(other) == (other, [])


def test_mistral_calls_are_read_in_both_of_its_forms():
    from tunelab.inference.tool_calls import MISTRAL

    listed = 'Checking. [TOOL_CALLS][{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]'
    assert _read(MISTRAL, listed) == ("Checking.", [("a", {"x": 1}), ("b", {})])
    named = '[TOOL_CALLS]a[ARGS]{"x": 1}[TOOL_CALLS]b[CALL_ID]Ab3dE6gH9[ARGS]{}'
    assert _read(MISTRAL, named) == (None, [("a", {"x": 1}), ("b", {})])
    _, calls = MISTRAL.read(named)
    assert all(len(c["id"]) == 9 and c["id"].isalnum() for c in calls)  # as Mistral's templates want them back
    for other in ("plain text", "[TOOL_CALLS]a[ARGS]not json", '[TOOL_CALLS][{"arguments": {}}]', "[TOOL_CALLS][]"):
        assert MISTRAL.read(other) == (other, [])


def test_llama3_json_calls_are_the_whole_answer():
    from tunelab.inference.tool_calls import LLAMA3_JSON

    one = '{"name": "a", "parameters": {"x": 1}}'
    assert _read(LLAMA3_JSON, one) == (None, [("a", {"x": 1})])
    assert _read(LLAMA3_JSON, f"<|python_tag|>{one}; " + '{"name": "b", "arguments": {}}') == (
        None,
        [("a", {"x": 1}), ("b", {})],
    )
    for other in ("Paris is sunny.", '{"name": "Bob", "age": 30}', one + " and some text", "{broken"):
        assert LLAMA3_JSON.read(other) == (other, [])


def test_streamed_text_stops_at_the_start_of_a_call():
    from tunelab.inference.tool_calls import HERMES, LLAMA3_JSON, MISTRAL

    assert HERMES.call_start("Sure, let me look") == len("Sure, let me look")
    assert HERMES.call_start("Sure.\n<tool") == len("Sure.\n")  # could be a call beginning: held back
    assert HERMES.call_start('Sure.\n<tool_call>{"name"') == len("Sure.\n")
    assert MISTRAL.call_start("Sure.[TOOL_") == len("Sure.")
    # a Llama 3 answer is held until its first character says whether it is a call
    assert [LLAMA3_JSON.call_start(t) for t in ("", " ", ' {"na', "<|python", "Paris")] == [0, 0, 0, 0, 5]


def test_a_request_s_tool_calls_are_read_as_training_reads_them():
    """An earlier call sent back in the messages: its arguments an object whether given as JSON text, as none or as
    "" (no arguments); a call written without `function` read the same; a call without a name, a 400."""
    from tunelab.inference.openai_requests import RequestError, parse_messages

    def calls(*given: dict) -> list[dict]:
        body = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "tool_calls": list(given)}]}
        return parse_messages(body)[1]["tool_calls"]

    nested = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    flat = {"name": "get_weather", "arguments": {"city": "Paris"}, "id": "c1"}
    assert (
        calls(nested)
        == calls(flat)
        == [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}, "id": "c1"}]
    )
    for empty in (None, "", "  "):
        assert calls({"function": {"name": "now", "arguments": empty}})[0]["function"]["arguments"] == {}
    from tunelab.data.formats import tool_call  # the one reader, training rows' too

    assert tool_call({**flat, "function": None}) == calls(flat)[0]  # a flat call beside nested ones in Parquet
    with pytest.raises(RequestError, match=r"tool_calls\[0\] is a tool call without a function name"):
        calls({"function": {"name": " ", "arguments": "{}"}})


def test_the_form_is_read_from_the_chat_template(tiny_llama):
    from types import SimpleNamespace

    from tunelab.inference.tool_calls import FORMS, HERMES, LLAMA3_JSON, MISTRAL, form_for
    from tunelab.models import load_tokenizer
    from tunelab.models.load import ModelSource

    tokenizer = load_tokenizer(ModelSource(str(tiny_llama), str(tiny_llama)))
    assert form_for(tokenizer) is HERMES  # tunelab's chatml, and any template that shows no other form
    llama = '{{- \'{"name": "\' + t.function.name + \'", "parameters": \' }}{{- "<|python_tag|>" }}'
    assert form_for(SimpleNamespace(chat_template=llama)) is LLAMA3_JSON
    assert form_for(SimpleNamespace(chat_template={"default": "x", "tool_use": "[TOOL_CALLS]"})) is MISTRAL
    assert [form_for(tokenizer, name).name for name in FORMS] == list(FORMS)

    # Named templates: the one transformers renders with (tool_use for a chat given tools), not all of them.
    from tunelab.inference.tool_calls import template_text

    named = SimpleNamespace(chat_template={"default": "plain", "tool_use": "tools", "rag": "documents"})
    assert template_text(named) == "plain" and template_text(named, tools=True) == "tools"
    assert template_text(SimpleNamespace(chat_template={"rag": "a", "other": "b"})) == "a b"  # no name to choose


# ---- reasoning (<think>...</think> before the answer)


def test_reasoning_is_read_apart_whole_and_as_it_streams():
    """The reasoning and the answer of a whole answer; streamed character by character, what is sent each time
    adds up to the same two parts (a marker split across tokens is held back, not sent as text); an answer cut
    inside its reasoning has no content; one without a think block is all content."""
    from tunelab.inference.reasoning import THINK

    answer = "<think>\nTwo and two.\n</think>\n\nIt is 4."
    assert THINK.parts(answer) == ("Two and two.", "It is 4.")
    assert THINK.parts("<think>\nstill thinking\n") == ("still thinking", None)
    assert THINK.parts("It is 4.") == (None, "It is 4.")
    assert THINK.parts("<think></think>It is 4.") == (None, "It is 4.")
    # As a person reads a whole answer (chat, generate): cut off while writing the open marker, or closed with
    # nothing after it, is no answer / an empty one; `<thinking` is no marker at all.
    assert THINK.read("<think>\nHm.\n</think>\n") == ("Hm.", "")
    assert THINK.read("<thin", cut=True) == (None, None)  # cut off as its reasoning began
    assert THINK.read("<") == (None, "<")  # an answer the model ended itself is what it wrote
    assert THINK.read("<thinking is not a marker") == (None, "<thinking is not a marker")
    for text in (answer, "It is 4.", "<thinking is not a marker", "<think>\ncut at </thi"):
        streamed = {"reasoning": "", "content": ""}
        for end in range(1, len(text) + 1):
            for name, part in zip(streamed, THINK.parts(text[:end], whole=False), strict=True):
                assert (part or "").startswith(streamed[name]), (text[:end], part)
                streamed[name] = part or ""
            assert "<" not in streamed["content"] or text.startswith("<thinking")
        assert (streamed["reasoning"] or None, streamed["content"] or None) != (None, None) or not text
        whole = THINK.parts(text)
        assert (whole[0] or "").startswith(streamed["reasoning"]) and (whole[1] or "").startswith(streamed["content"])


def test_a_reasoning_model_s_answer_comes_back_with_its_reasoning_apart(reasoner):
    """As vLLM's reasoning parsers return it: `reasoning` (and `reasoning_content`) beside the answer's content,
    whole and streamed alike; --reasoning-parser none returns the answer as written; an earlier answer's reasoning
    sent back in the messages is accepted."""
    from tunelab.inference.generate import load_run
    from tunelab.inference.openai_api import create_app

    asked = {"model": "r", "messages": [{"role": "user", "content": "What is 2+2?"}], "temperature": 0}
    asked["max_tokens"] = 32
    loaded = load_run(reasoner)
    with running(create_app(*loaded, model_name="r")) as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        message = client.chat.completions.create(**asked).choices[0].message
        extra = message.model_extra
        assert (extra["reasoning"], extra["reasoning_content"], message.content) == (
            "Two and two make four.",
            "Two and two make four.",
            "4",
        )
        chunks = list(client.chat.completions.create(**asked, stream=True))
        deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
        reasoning = "".join((d.model_extra or {}).get("reasoning") or "" for d in deltas)
        assert reasoning == "Two and two make four." and "".join(d.content or "" for d in deltas) == "4"
        first_content = next(i for i, d in enumerate(deltas) if d.content)
        assert not any((d.model_extra or {}).get("reasoning") for d in deltas[first_content:])

        again = [*asked["messages"], {"role": "assistant", "content": "4", "reasoning": extra["reasoning"]}]
        again.append({"role": "user", "content": "What is 2+2?"})
        assert client.chat.completions.create(**(asked | {"messages": again})).choices[0].finish_reason

        # Log-probs with the stream: after the reasoning and the content, before the finish and the usage chunks;
        # every generated token's, the reasoning's too, as without stream.
        scored = asked | {"logprobs": True, "stream_options": {"include_usage": True}}
        chunks = list(client.chat.completions.create(**scored, stream=True))
        kinds = [
            "usage" if not c.choices else "logprobs" if c.choices[0].logprobs else "finish"
            if c.choices[0].finish_reason else "text" for c in chunks
        ]  # fmt: skip
        assert kinds[-3:] == ["logprobs", "finish", "usage"] and set(kinds[:-3]) == {"text"}
        whole = client.chat.completions.create(**(asked | {"logprobs": True})).choices[0].logprobs.content
        assert [t.token for t in chunks[-3].choices[0].logprobs.content] == [t.token for t in whole]
        assert "".join(t.token for t in whole).startswith("<think>")

    with running(create_app(*loaded, model_name="r", reasoning_parser="none")) as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        message = client.chat.completions.create(**asked).choices[0].message
        assert message.content == "<think>\nTwo and two make four.\n</think>\n\n4" and not message.model_extra


def test_chat_template_kwargs_reach_the_template(loaded):
    """vLLM's chat_template_kwargs are the template's variables: Qwen3's `enable_thinking: false` writes an empty
    think block into the prompt (here, a ChatML template that reads it as Qwen3's does); the arguments
    apply_chat_template takes for itself are refused."""
    import copy

    from tunelab.data.templates import template_source
    from tunelab.inference.openai_api import create_app

    model, tokenizer = loaded
    tokenizer = copy.deepcopy(tokenizer)
    qwen3_like = "{%- if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{%- endif %}"
    chatml = template_source("chatml", tokenizer).rstrip()
    tokenizer.chat_template = chatml.removesuffix("{%- endif -%}") + qwen3_like + "{%- endif -%}"  # in the prompt
    with running(create_app(model, tokenizer, model_name="tiny")) as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=30)

        def prompt_tokens(options) -> int:
            body = {"chat_template_kwargs": options}
            return client.chat.completions.create(
                model="tiny", messages=HELLO, max_tokens=1, extra_body=body
            ).usage.prompt_tokens

        assert (
            prompt_tokens({"enable_thinking": False}) > prompt_tokens({"enable_thinking": True}) == prompt_tokens({})
        )
        with pytest.raises(openai.BadRequestError, match="chat_template_kwargs may not set add_generation_prompt"):
            prompt_tokens({"add_generation_prompt": False})
        with pytest.raises(openai.BadRequestError, match="may not set eos_token"):  # as training refuses it
            prompt_tokens({"eos_token": "</s>"})
        with pytest.raises(openai.BadRequestError, match="chat_template_kwargs must be an object"):
            prompt_tokens([1])


def test_a_forced_call_after_an_empty_think_block_is_a_call_alone(tiny_tokenizer):
    """Qwen3's template writes an empty think block before the last answer, a forced call's too: the block is
    read off as (no) reasoning, so the content holds nothing of it."""
    from tunelab.inference.openai_api import ChatAnswer
    from tunelab.inference.reasoning import THINK
    from tunelab.inference.tool_calls import HERMES

    answer = ChatAnswer('<think>\n\n</think>\n\n<tool_call>\n{"name": "', THINK, HERMES)
    reasoning, content, calls = answer.message('get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    assert (reasoning, content, [c["function"]["name"] for c in calls]) == (None, None, ["get_weather"])


def test_deepseek_r1_answers_begin_inside_the_block():
    """`--reasoning-parser deepseek_r1`, as vLLM's parser of that name: the R1 templates open the block, so an
    answer is reasoning up to </think> with or without its own <think>, and all reasoning without one. A block
    closed with nothing after it leaves no content (null, as vLLM returns it)."""
    from tunelab.inference.reasoning import THINK, thinking_for

    r1 = thinking_for("deepseek_r1")
    assert r1.parts("Two and two.\n</think>\n\n4") == ("Two and two.", "4") == r1.parts("<think>Two and two.</think>4")
    assert r1.parts("still thinking") == ("still thinking", None)
    assert THINK.parts("still thinking") == (None, "still thinking") and thinking_for("qwen3") == THINK
    assert THINK.parts("<think>done</think>\n\n") == ("done", None) and thinking_for("none") is None
