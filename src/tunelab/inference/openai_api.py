"""The OpenAI-compatible HTTP API over one model, in the shapes of https://platform.openai.com/docs/api-reference:
`GET /v1/models`, `POST /v1/chat/completions` and `POST /v1/completions`, with or without streaming (server-sent
events), so the official `openai` client and the tools built on it work unchanged.

The routes are this module's functions; `create_app` puts the served model in the app's state (`Served`) and
registers them. What a request may ask is checked in inference/openai_requests.py; the text comes from
inference/streaming.py, and streaming and non-streaming answers come from that same code path (so they are the
same text). A chat answer's reasoning and tool calls are read apart from its content (`ChatAnswer`: reasoning.py,
tool_calls.py). `tunelab serve` (inference/serve.py) loads the model and runs the app with uvicorn.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at run time.
import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from tunelab.data.images import as_template_reads, image_parts, open_image
from tunelab.data.templates import template_text, with_reasoning
from tunelab.inference.openai_requests import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    RequestError,
    parse_echo,
    parse_logprobs,
    parse_messages,
    parse_prompt,
    parse_sampling,
    parse_template_kwargs,
    parse_tools,
)
from tunelab.inference.reasoning import Thinking, reasoning_fields, thinking_for
from tunelab.inference.streaming import Generation, encode_prompt
from tunelab.inference.tool_calls import HERMES, ToolCallForm, forced_start, form_for

log = logging.getLogger("tunelab")


@dataclass
class Scoring:
    """What a request asks of log-probs (inference/logprobs.py): how many of the likeliest tokens at each place,
    and (text completions) whether the prompt is echoed, scored too, before the answer."""

    top: int | None  # None: no log-probs
    echo: bool = False
    prompt: str | None = None  # the prompt as given, to echo (None: its token ids, decoded)

    def choice_fields(self, generation: Generation, kind: str, text: str) -> dict[str, Any]:
        """The answer's `logprobs` (and an echoed text completion's text), worked out once it is whole."""
        from tunelab.inference.logprobs import chat_logprobs, completion_logprobs, score

        prompt = generation.input_ids[0].tolist()
        fields: dict[str, Any] = {}
        if self.echo:
            echoed = self.prompt if self.prompt is not None else generation.tokenizer.decode(prompt)
            fields["text"] = echoed + text
        if self.top is None:
            return fields
        answer = generation.answer_ids(keep_end=kind != "chat")
        with generation.lock:  # one forward pass on the model, in its turn
            scored = score(generation.model, prompt + answer, 0 if self.echo else len(prompt), self.top)
        if kind == "chat":
            return fields | {"logprobs": chat_logprobs(generation.tokenizer, scored)}
        return fields | {"logprobs": completion_logprobs(generation.tokenizer, scored, self.top)}


@dataclass
class ChatAnswer:
    """How a chat answer's text becomes OpenAI's message: after the beginning written for the model (a think
    block its template opened, a forced call's opening), its reasoning read apart (reasoning.py), then its tool
    calls read out of the rest in the form the model writes them (tool_calls.py), one or several."""

    lead: str = ""
    thinking: Thinking | None = None
    tools: ToolCallForm | None = None
    parallel: bool = True

    def parts(self, generated: str, whole: bool) -> tuple[str | None, str | None]:
        """(reasoning, content) of the answer so far, or whole: Thinking.parts."""
        text = self.lead + generated
        return self.thinking.parts(text, whole) if self.thinking else (None, text)

    def message(self, generated: str) -> tuple[str | None, str | None, list[dict[str, Any]]]:
        """The whole answer's reasoning, content (its calls taken out) and tool calls."""
        reasoning, content = self.parts(generated, whole=True)
        return reasoning, *self.read_calls(content)

    def read_calls(self, content: str | None) -> tuple[str | None, list[dict[str, Any]]]:
        """A whole answer's content without its tool calls, and the calls (one at most without `parallel`)."""
        if self.tools is None or content is None:
            return content, []
        content, calls = self.tools.read(content)
        return content, calls if self.parallel else calls[:1]

    def own_text(self, content: str, calls: list[dict[str, Any]]) -> str:
        """The part of the content that is the model's own text: all of it, or (with calls) what is outside them."""
        return self.tools.own_text(content) if calls and self.tools else content

    def shown(self, content: str) -> int:
        """How much of the content streamed so far can be sent: all of it, or up to where the calls begin."""
        return self.tools.call_start(content) if self.tools else len(content)


@dataclass
class Served:
    """The one model an app serves, and what its routes share."""

    model: Any
    tokenizer: Any
    name: str  # the id /v1/models lists; requests may name any model (there is one), and get this one
    api_key: str | None = None  # when set, every request must carry `Authorization: Bearer <api_key>`
    tool_form: ToolCallForm = HERMES  # how the model writes tool calls (tool_calls.py)
    thinking: Thinking | None = None  # how it writes its reasoning (reasoning.py); None: its answers are all content
    processor: Any = None  # a vision-language model's: chat requests may show images (data: URIs)
    lock: threading.Lock = field(default_factory=threading.Lock)  # one generation at a time on the model
    created: int = field(default_factory=lambda: int(time.time()))

    def card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "tunelab"}


def served(request: Request) -> Served:
    return request.app.state.served


# The key check and the model list are `async def`: a plain `def` runs in the worker threads, which requests
# waiting their turn on the model hold, so under load even a 401 or /v1/models would wait behind them.
async def check_key(request: Request) -> None:
    api_key = served(request).api_key
    if api_key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # compare_digest: the time taken does not tell an attacker how much of a guess was right.
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        raise HTTPException(401, "Incorrect or missing API key: send Authorization: Bearer <key>")


router = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])


def create_app(
    model: Any,
    tokenizer: Any,
    model_name: str,
    api_key: str | None = None,
    tool_call_parser: str = "auto",
    reasoning_parser: str = "think",
    processor: Any = None,
) -> FastAPI:
    """The FastAPI app serving `model` under the name `model_name`.

    Args:
        model: A loaded causal LM (from `load_run`).
        tokenizer: Its tokenizer; chat requests need it to carry a chat template.
        model_name: The id listed by /v1/models and returned in every response. Requests may name any model: with
            one model loaded there is nothing to choose, and clients that insist on a name keep working.
        api_key: When set, every request must carry `Authorization: Bearer <api_key>`, else it gets a 401.
        tool_call_parser: The form the model writes tool calls in (tool_calls.FORMS), or "auto": the one its chat
            template writes.
        reasoning_parser: How the model writes its reasoning (reasoning.PARSERS: `<think>...</think>` before the
            answer, returned apart), or "none": answers are returned as written.
        processor: A vision-language model's processor (generate.load_processor_of): chat requests may then show
            images, as OpenAI's `image_url` parts holding data: URIs.
    """
    if api_key is not None and not api_key.strip():
        raise ValueError("api_key is empty: pass None to serve without a key")
    app = FastAPI(title="tunelab")
    tool_form, thinking = form_for(tokenizer, tool_call_parser), thinking_for(reasoning_parser)
    app.state.served = Served(
        model, tokenizer, model_name, api_key, tool_form=tool_form, thinking=thinking, processor=processor
    )
    app.include_router(router)
    app.add_exception_handler(RequestError, bad_request)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, server_error)
    return app


# ---- errors, as OpenAI sends them --------------------------------------------------------------------------------


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


async def bad_request(request: Request, err: RequestError) -> JSONResponse:
    return JSONResponse(error_body(err.message, param=err.param, code=err.code), status_code=400)


async def http_error(request: Request, err: HTTPException) -> JSONResponse:
    code = "invalid_api_key" if err.status_code == 401 else None
    return JSONResponse(error_body(str(err.detail), code=code), status_code=err.status_code, headers=err.headers)


async def server_error(request: Request, err: Exception) -> JSONResponse:
    # Starlette re-raises the error after this answer is sent, so uvicorn logs the traceback server-side.
    return JSONResponse(error_body(f"internal error: {err}", kind="server_error"), status_code=500)


# ---- the routes --------------------------------------------------------------------------------------------------


@router.get("/models")
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": [served(request).card()]}


@router.get("/models/{name:path}")
async def get_model(request: Request, name: str) -> dict:
    model = served(request)
    if name != model.name:
        raise HTTPException(404, f"model {name!r} is not served here; this server serves {model.name!r}")
    return model.card()


@router.post("/chat/completions")
async def chat_completions(request: Request) -> Any:
    model, body = served(request), await read_body(request)
    messages = parse_messages(body, images=model.processor is not None)
    sampling, asked = parse_sampling(body), parse_tools(body)
    shown = [ref for _, ref in image_parts(messages)]
    if shown and parse_logprobs(body, chat=True) is not None:
        raise RequestError("logprobs are not given for a chat that shows images yet", "logprobs")
    if body.get("echo") not in (None, False):
        raise RequestError("echo is for /v1/completions (a chat answer does not repeat its messages)", "echo")
    tools, tokenizer, options = asked.tools, model.tokenizer, parse_template_kwargs(body)
    if not getattr(tokenizer, "chat_template", None):
        raise RequestError(f"{model.name} has no chat template: use /v1/completions with a plain prompt")
    messages = with_reasoning([messages], template_text(tokenizer, bool(tools)))[0]  # earlier reasoning, as trained
    messages = as_template_reads(messages)  # (an image's bytes are for the processor)
    try:
        render = {"tokenize": False, "add_generation_prompt": True, **options}
        text = tokenizer.apply_chat_template(messages, tools=tools, **render)
        plain = tools and tokenizer.apply_chat_template(messages, **render)
    except Exception as err:  # e.g. a template that insists on alternating user/assistant turns
        raise RequestError(f"the chat template refused these messages: {err}", "messages") from None
    if tools and text == plain:  # the model would answer without ever seeing the tools
        raise RequestError(f"{model.name}'s chat template does not write tool definitions", "tools")
    start = ""  # the answer's beginning, written for the model: a forced call's opening
    if asked.forced is not None:
        start = forced_start(tokenizer, messages, tools, text, asked.forced, options)
        if start is None:
            raise RequestError(f"{model.name}'s chat template writes no tool call to begin here", "tool_choice")
    extra: dict[str, Any] = {}
    if shown:  # the processor writes the images into the prompt's tokens, and makes their pixels (off the loop)

        def image_inputs() -> Any:
            model.processor.tokenizer = tokenizer  # the run's (its template), as the processor's own
            opened = [[open_image(ref) for ref in shown]]
            return model.processor(text=[text + start], images=opened, add_special_tokens=False, return_tensors="pt")

        try:
            inputs = await run_in_threadpool(image_inputs)
        except (ValueError, OSError) as err:  # e.g. a turn that writes the image token itself
            raise RequestError(f"the images cannot be written into this prompt: {err}", "messages") from None
        ids = encode_prompt(model.model, tokenizer, inputs["input_ids"][0].tolist(), templated=True, sampling=sampling)
        extra = {k: v.to(model.model.device) for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    else:
        ids = encode_prompt(model.model, tokenizer, text + start, templated=True, sampling=sampling)
    form, thinking = model.tool_form if tools else None, model.thinking
    markers = (form.markers if form else ()) + (thinking.markers if thinking else ())
    generation = Generation(model.model, tokenizer, model.lock, ids, sampling, markers, extra)
    lead = (thinking.opened_by(text) if thinking else "") + start
    answer = ChatAnswer(lead, thinking, form, asked.parallel)
    return await respond(request, body, generation, "chat", model, answer, Scoring(parse_logprobs(body, chat=True)))


@router.post("/completions")
async def completions(request: Request) -> Any:
    model, body = served(request), await read_body(request)
    prompt, echo = parse_prompt(body), parse_echo(body)
    sampling = parse_sampling(body, scoring_only=echo)
    scoring = Scoring(parse_logprobs(body, chat=False), echo, prompt if isinstance(prompt, str) else None)
    if body.get("tools"):  # a plain prompt has no template to hand them to
        raise RequestError("tools are for /v1/chat/completions (a chat template writes them)", "tools")
    if sampling.max_tokens is None:
        sampling.max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
    ids = encode_prompt(model.model, model.tokenizer, prompt, templated=False, sampling=sampling)
    generation = Generation(model.model, model.tokenizer, model.lock, ids, sampling)
    return await respond(request, body, generation, "text", model, scoring=scoring)


async def read_body(request: Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise RequestError("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


# ---- the answers -------------------------------------------------------------------------------------------------


async def respond(
    request: Request,
    body: dict,
    generation: Generation,
    kind: str,
    model: Served,
    answer: ChatAnswer | None = None,
    scoring: Scoring | None = None,
) -> Any:
    """The answer to a chat (kind "chat", read as `answer` says) or text completion request, streamed or whole;
    with `scoring`, log-probs (streamed: in one chunk once the answer is whole)."""
    rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    head = {"id": rid, "created": int(time.time()), "model": model.name}
    if not body.get("stream"):
        # Generation blocks, so it runs off the event loop; a client that hangs up (its timeout, then its retry)
        # stops it at the next token instead of leaving the whole answer to be made for no one, lock held.
        whole = asyncio.ensure_future(run_in_threadpool(whole_answer, generation, kind, head, answer, scoring))
        while not (await asyncio.wait({whole}, timeout=0.5))[0]:
            if await request.is_disconnected():
                generation.cancel()
        return whole.result()
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream
    events = answer_events(generation, kind, head, include_usage, answer, scoring)
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


def whole_answer(
    generation: Generation, kind: str, head: dict, answer: ChatAnswer | None = None, scoring: Scoring | None = None
) -> dict:
    text = "".join(generation) if generation.sampling.max_tokens else ""
    if not generation.sampling.max_tokens:  # an echoed prompt, to score it: nothing generated, as OpenAI says it
        generation.finish_reason = "length"
    scored = scoring.choice_fields(generation, kind, text) if scoring else {}
    if kind == "chat":
        reasoning, content, calls = (answer or ChatAnswer()).message(text)
        message = {"role": "assistant", "content": content} | reasoning_fields(reasoning)
        message |= {"tool_calls": calls} if calls else {}
        finish = _finish(generation, calls)
        choices = [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish} | scored]
        return head | {"object": "chat.completion", "choices": choices, "usage": usage(generation)}
    choices = [choice(kind, text, generation.finish_reason) | scored]
    return head | {"object": "text_completion", "choices": choices, "usage": usage(generation)}


def answer_events(
    generation: Generation,
    kind: str,
    head: dict,
    include_usage: bool,
    answer: ChatAnswer | None = None,
    scoring: Scoring | None = None,
) -> Iterator[str]:
    """The server-sent events of a streamed answer. A sync generator: Starlette iterates it in a worker thread, so
    waiting on the model blocks no one. A chat answer's reasoning streams first, as `reasoning` deltas, then its
    content; with tools, the content before the first call streams as usual, and the calls are sent at the end,
    read whole (tool_calls.py). Log-probs, asked for, are scored once the answer is whole and sent in one chunk
    after its text (a client joining every chunk's `logprobs` gets the whole answer's, as without stream)."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    extra = {"usage": None} if include_usage else {}

    def event(delta: dict | str | None, finish: str | None = None, **fields: Any) -> str:
        return sse(head | {"object": obj, "choices": [choice(kind, delta, finish) | fields]} | extra)

    if kind == "chat":  # OpenAI's first chunk carries the role only
        yield sse(head | {"object": obj, "choices": [choice(kind, None, None, first=True)]} | extra)
    answer = answer or ChatAnswer()
    calls: list[dict[str, Any]] = []
    try:
        text, said, sent = "", 0, 0  # the answer so far; how much of its reasoning and its content was sent
        for piece in generation:
            text += piece
            if kind != "chat":
                if piece:
                    yield event(piece)
                continue
            reasoning, content = answer.parts(text, whole=False)
            if reasoning and len(reasoning) > said:
                yield event(reasoning_fields(reasoning[said:]))
                said = len(reasoning)
            # With tools, the content is sent up to the first call; from there it is held and read whole at the
            # end. Meanwhile each piece sends an SSE comment (clients skip it), so that a client that has gone
            # away still stops the generation at its next token.
            shown = answer.shown(content or "")
            if shown > sent:
                yield event({"content": content[sent:shown]})
                sent = shown
            elif answer.tools:
                yield ": generating\n\n"
        if kind == "chat":  # what was held back, now that the answer is whole
            reasoning, content = answer.parts(text, whole=True)
            calls = answer.read_calls(content)[1]
            if reasoning and len(reasoning) > said:
                yield event(reasoning_fields(reasoning[said:]))
            rest = answer.own_text((content or "")[sent:], calls)  # the calls' text after `sent` is read here
            if rest:
                yield event({"content": rest})
            if calls:
                deltas = [{"index": i, **call} for i, call in enumerate(calls)]
                yield event({"tool_calls": deltas})
        if scoring is not None and scoring.top is not None:  # (echo is not streamed: the log-probs alone)
            yield event(None, logprobs=scoring.choice_fields(generation, kind, text)["logprobs"])
    except Exception as err:  # headers are sent: report in the stream, as OpenAI does
        log.exception("streaming generation failed")
        yield sse(error_body(f"internal error: {err}", kind="server_error"))
        return
    yield event(None, _finish(generation, calls))
    if include_usage:
        yield sse(head | {"object": obj, "choices": [], "usage": usage(generation)})
    yield sse("[DONE]")


def _finish(generation: Generation, calls: list[dict[str, Any]]) -> str:
    """OpenAI's finish_reason: "tool_calls" when the answer calls tools, unless it was cut at max_tokens (a call
    cut off there is dropped: "length" says the answer is not whole)."""
    if calls and generation.finish_reason != "length":
        return "tool_calls"
    return generation.finish_reason


def usage(generation: Generation) -> dict:
    return {
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": generation.completion_tokens,
        "total_tokens": generation.prompt_tokens + generation.completion_tokens,
    }


def choice(kind: str, delta: dict | str | None, finish: str | None, first: bool = False) -> dict:
    """One streamed choice: a text completion's text, or a chat answer's delta (its content, reasoning or calls)."""
    if kind != "chat":
        return {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
    delta = {"role": "assistant", "content": ""} if first else delta or {}
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


def sse(data: dict | str) -> str:
    """One server-sent event, as OpenAI sends them: `data: <json>` and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
