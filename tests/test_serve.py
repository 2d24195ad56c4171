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
    """A run that learned to call get_weather for Paris, through tunelab's ChatML (its Hermes tool form)."""
    import json

    from tests.conftest import learn_by_heart

    folder = tmp_path_factory.mktemp("tool-caller")
    call = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    chat = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
    ]
    data = folder / "calls.jsonl"
    data.write_text("".join(json.dumps({"messages": chat, "tools": [WEATHER]}) + "\n" for _ in range(16)))
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

        # The call and its result go back as the next turn: read as training had them, answered (text or a call).
        turn = {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls]}
        result = {"role": "tool", "tool_call_id": calls[0].id, "content": "18 C, sunny"}
        followed = client.chat.completions.create(
            model="caller", messages=[*asked["messages"], turn, result], tools=[WEATHER], max_tokens=4
        )
        assert followed.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_tools_a_chat_template_does_not_write_are_refused(client):
    with pytest.raises(openai.BadRequestError, match="does not write tool definitions"):
        client.chat.completions.create(model="tiny", messages=HELLO, tools=[WEATHER], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.chat.completions.create(model="tiny", messages=HELLO, tools=[WEATHER], tool_choice="required")


def test_tool_calls_are_read_back_in_openai_s_form_and_other_text_stays_text():
    import json

    from tunelab.inference.tool_calls import read_tool_calls

    text = 'Let me check.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
    text += '<tool_call>{"name": "b"}</tool_call>'
    content, calls = read_tool_calls(text)
    assert content == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("a", {"x": 1}),
        ("b", {}),
    ]
    assert len({c["id"] for c in calls}) == 2
    for other in ("no calls here", "<tool_call>not json</tool_call>", '<tool_call>{"arguments": {}}</tool_call>'):
        assert read_tool_calls(other) == (other, [])
    # text after the calls is kept; null arguments are none (as training reads them)
    content, calls = read_tool_calls('<tool_call>{"name": "c", "arguments": null}</tool_call>\nDone.')
    assert content == "Done." and calls[0]["function"]["arguments"] == "{}"


def test_streamed_text_stops_at_the_start_of_a_call():
    from tunelab.inference.tool_calls import call_start

    assert call_start("Sure, let me look") == len("Sure, let me look")
    assert call_start("Sure.\n<tool") == len("Sure.\n")  # could be a call beginning: held back
    assert call_start('Sure.\n<tool_call>{"name"') == len("Sure.\n")
