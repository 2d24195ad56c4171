"""An OpenAI-compatible HTTP API over one model: `tunelab serve --model RUN_FOLDER`.

Called by `tunelab serve` (through `serve()` and `add_arguments()`) and by `python -m tunelab.inference.serve`;
the checks of what a request may ask live in openai_requests.py.
It serves `GET /v1/models`, `POST /v1/chat/completions` and `POST /v1/completions`, with or without streaming
(server-sent events), in the shapes of https://platform.openai.com/docs/api-reference, so the official `openai`
client and the tools built on it work unchanged: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="x")`.

The model is loaded with `load_run`, so a run folder answers chat requests through the chat template it was
trained with. There is one model and one device, so requests are generated one at a time (a lock); each request
runs `model.generate` in a worker thread and reads its text through transformers' `TextIteratorStreamer`, and
streaming and non-streaming answers come from that same code path (so they are the same text).

FastAPI, uvicorn and torch are imported inside the functions that need them, so this module imports with the
base dependencies only.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations (`request: Request`) at
# run time, and with string annotations it could not resolve names imported inside create_app.
import argparse
import hmac
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.errors import TunelabError
from tunelab.inference.openai_requests import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    RequestError,
    Sampling,
    parse_messages,
    parse_prompt,
    parse_sampling,
)

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger("tunelab")

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
# ---- generating ------------------------------------------------------------------------------------------------


class Generation:
    """One request's generation: iterate it for text pieces as the model produces them.

    `model.generate` runs in a worker thread that holds the server's lock, so requests take turns on the model and
    the lock is released when generation ends even if the client has gone away. Stop strings are applied to the
    decoded text (the model knows only tokens): text that could be the start of a stop string is held back until
    it is clear that it is not. After iteration, finish_reason and the token counts are set.
    """

    def __init__(self, model: Any, tokenizer: Any, lock: threading.Lock, input_ids: Any, sampling: Sampling) -> None:
        self.model, self.tokenizer, self.lock, self.sampling = model, tokenizer, lock, sampling
        self.input_ids = input_ids
        self.prompt_tokens = int(input_ids.shape[1])
        self.completion_tokens = 0
        self.finish_reason = "stop"
        self._stop = threading.Event()  # set by the reader: a stop string was seen, or the client went away
        self._error: BaseException | None = None
        self._output: Any = None

    def __iter__(self) -> Iterator[str]:
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        worker = threading.Thread(target=self._generate, args=(streamer,), daemon=True)
        worker.start()
        text, sent, stopped = "", 0, False
        try:
            for piece in streamer:
                text += piece
                cut = min((i for i in (text.find(s) for s in self.sampling.stop) if i >= 0), default=-1)
                if cut >= 0:
                    stopped = True
                    self._stop.set()
                    if text[sent:cut]:
                        yield text[sent:cut]
                    break
                safe = len(text) - _held_back(text, self.sampling.stop)
                if safe > sent:
                    yield text[sent:safe]
                    sent = safe
            else:
                if text[sent:]:
                    yield text[sent:]
        finally:
            # After a stop string, or when the reader quits (a dropped client closes the response), the worker is
            # asked to stop at its next token: it holds the lock, and should not run on to max_tokens for no one.
            # No join here: an abandoned generator may be finalized by the garbage collector in any thread.
            self._stop.set()
        worker.join()  # only on a normal end, when the worker has ended the stream (or is about to)
        if self._error is not None:
            raise self._error
        self._count(stopped)

    def _generate(self, streamer: Any) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        stop_event = self._stop

        class StopWhenAsked(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full(
                    (input_ids.shape[0],), stop_event.is_set(), dtype=torch.bool, device=input_ids.device
                )

        s = self.sampling
        # OpenAI has no top_k: switch transformers' default top_k=50 off so the request means what it says.
        sampling = {"temperature": s.temperature, "top_p": s.top_p, "top_k": 0} if s.temperature > 0 else {}
        try:
            with self.lock:
                if self._stop.is_set():  # the client left while waiting for its turn
                    streamer.end()
                    return
                if s.seed is not None:
                    torch.manual_seed(s.seed)  # the global generator, but the lock makes the request its only user
                with torch.no_grad():
                    self._output = self.model.generate(
                        input_ids=self.input_ids,
                        attention_mask=torch.ones_like(self.input_ids),
                        max_new_tokens=s.max_tokens,
                        do_sample=s.temperature > 0,
                        pad_token_id=_pad_token_id(self.tokenizer),
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([StopWhenAsked()]),
                        **sampling,
                    )
        except BaseException as err:
            # Handed to the reader, which re-raises it; ending the stream keeps the reader from waiting forever.
            self._error = err
            streamer.end()

    def _count(self, stopped: bool) -> None:
        if self._output is None:
            return
        new = self._output[0, self.prompt_tokens :].tolist()
        self.completion_tokens = len(new)
        ended = bool(new) and new[-1] in _eos_ids(self.model, self.tokenizer)
        if not stopped and not ended and self.completion_tokens >= (self.sampling.max_tokens or 0):
            self.finish_reason = "length"


def _held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of `text` could be the start of a stop string (so must wait for more)."""
    return max((n for s in stops for n in range(len(s) - 1, 0, -1) if text.endswith(s[:n])), default=0)


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _pad_token_id(tokenizer: Any) -> int | None:
    # Many causal LMs have no pad token; generate() then warns on every call. One sequence needs no padding.
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _encode(model: Any, tokenizer: Any, text: str, templated: bool, sampling: Sampling) -> Any:
    """Token ids of the prompt on the model's device; max_tokens checked against (or defaulted to) the context."""
    # A chat template writes its own BOS where the model wants one (as in generate.format_prompt).
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=not templated)["input_ids"].to(model.device)
    context = getattr(model.config, "max_position_embeddings", None)
    prompt_tokens = int(ids.shape[1])
    if context is not None:
        if prompt_tokens >= context:
            raise RequestError(f"the prompt is {prompt_tokens} tokens; this model's context is {context} tokens")
        if sampling.max_tokens is None:
            sampling.max_tokens = context - prompt_tokens
        elif prompt_tokens + sampling.max_tokens > context:
            raise RequestError(
                f"this model's context is {context} tokens, but {prompt_tokens} prompt tokens and max_tokens "
                f"{sampling.max_tokens} were asked for",
                "max_tokens",
            )
    if sampling.max_tokens is None:
        sampling.max_tokens = 512  # a model that does not say its context length
    return ids


# ---- the HTTP app ----------------------------------------------------------------------------------------------


def _error(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _sse(data: dict | str) -> str:
    """One server-sent event, as OpenAI sends them: `data: <json>` and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def create_app(model: Any, tokenizer: Any, model_name: str, api_key: str | None = None) -> "FastAPI":
    """The FastAPI app serving `model` under the name `model_name`.

    Args:
        model: A loaded causal LM (from `load_run`).
        tokenizer: Its tokenizer; chat requests need it to carry a chat template.
        model_name: The id listed by /v1/models and returned in every response. Requests may name any model: with
            one model loaded there is nothing to choose, and clients that insist on a name keep working.
        api_key: When set, every request must carry `Authorization: Bearer <api_key>`, else it gets a 401.
    """
    from fastapi import Depends, FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    lock = threading.Lock()
    created = int(time.time())

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken does not tell an attacker how much of a guess was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise HTTPException(401, "Incorrect or missing API key: send Authorization: Bearer <key>")

    app = FastAPI(title="tunelab", dependencies=[Depends(check_key)])

    @app.exception_handler(RequestError)
    async def bad_request(request: Request, err: RequestError) -> JSONResponse:
        return JSONResponse(_error(err.message, param=err.param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        code = "invalid_api_key" if err.status_code == 401 else None
        return JSONResponse(_error(str(err.detail), code=code), status_code=err.status_code, headers=err.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception) -> JSONResponse:
        # Starlette re-raises the error after this answer is sent, so uvicorn logs the traceback server-side.
        return JSONResponse(_error(f"internal error: {err}", kind="server_error"), status_code=500)

    async def read_body(request: Request) -> dict:
        try:
            body = await request.json()
        except ValueError:
            raise RequestError("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        return body

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "tunelab"}

    @app.get("/v1/models")
    def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    def get_model(name: str) -> dict:
        if name != model_name:
            raise HTTPException(404, f"model {name!r} is not served here; this server serves {model_name!r}")
        return model_card()

    async def respond(body: dict, generation: Generation, kind: str) -> Any:
        """The answer to a chat (kind "chat") or text completion request, streamed or whole."""
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": rid, "created": int(time.time()), "model": model_name}

        def usage() -> dict:
            total = generation.prompt_tokens + generation.completion_tokens
            return {
                "prompt_tokens": generation.prompt_tokens,
                "completion_tokens": generation.completion_tokens,
                "total_tokens": total,
            }

        def choice(text: str | None, finish: str | None, first: bool = False) -> dict:
            if kind != "chat":
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            delta = {"role": "assistant", "content": ""} if first else {} if text is None else {"content": text}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

        if not body.get("stream"):

            def whole() -> dict:
                text = "".join(generation)
                if kind == "chat":
                    answer = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
                    choices = [answer | {"finish_reason": generation.finish_reason}]
                    return head | {"object": "chat.completion", "choices": choices, "usage": usage()}
                choices = [choice(text, generation.finish_reason)]
                return head | {"object": "text_completion", "choices": choices, "usage": usage()}

            return await run_in_threadpool(whole)  # generation blocks: keep it off the event loop

        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def events() -> Iterator[str]:
            # A sync generator: Starlette iterates it in a worker thread, so waiting on the model blocks no one.
            extra = {"usage": None} if include_usage else {}
            if kind == "chat":  # OpenAI's first chunk carries the role only
                yield _sse(head | {"object": obj, "choices": [choice(None, None, first=True)]} | extra)
            try:
                for piece in generation:
                    yield _sse(head | {"object": obj, "choices": [choice(piece, None)]} | extra)
            except Exception as err:  # headers are sent: report in the stream, as OpenAI does
                log.exception("streaming generation failed")
                yield _sse(_error(f"internal error: {err}", kind="server_error"))
                return
            yield _sse(head | {"object": obj, "choices": [choice(None, generation.finish_reason)]} | extra)
            if include_usage:
                yield _sse(head | {"object": obj, "choices": [], "usage": usage()})
            yield _sse("[DONE]")

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await read_body(request)
        messages, sampling = parse_messages(body), parse_sampling(body)
        if not getattr(tokenizer, "chat_template", None):
            raise RequestError(f"{model_name} has no chat template: use /v1/completions with a plain prompt")
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # e.g. a template that insists on alternating user/assistant turns
            raise RequestError(f"the chat template refused these messages: {err}", "messages") from None
        ids = _encode(model, tokenizer, text, templated=True, sampling=sampling)
        return await respond(body, Generation(model, tokenizer, lock, ids, sampling), "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await read_body(request)
        prompt, sampling = parse_prompt(body), parse_sampling(body)
        if sampling.max_tokens is None:
            sampling.max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
        ids = _encode(model, tokenizer, prompt, templated=False, sampling=sampling)
        return await respond(body, Generation(model, tokenizer, lock, ids, sampling), "text")

    return app


# ---- the command -----------------------------------------------------------------------------------------------


def _check_port_free(host: str, port: int) -> None:
    """Fail with a clear message before loading the model when the port is taken (uvicorn would exit later)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise TunelabError(
                f"cannot listen on {host}:{port} ({err.strerror}); pass another --port or --host"
            ) from None


def serve(
    model_path: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_name: str | None = None,
    log_level: str = "info",
) -> None:
    """Load a model and serve it over an OpenAI-compatible API until interrupted.

    Args:
        model_path: A run folder, model folder, .gguf file or hub id (as for `tunelab generate`).
        host: The address to listen on. The default serves this machine only; any other address lets the network
            in, so a warning is logged unless `api_key` is set.
        port: The port to listen on.
        api_key: When set, requests must send `Authorization: Bearer <api_key>` (the openai client's `api_key`).
        model_name: The model id clients see; defaults to the folder name (or the hub id).
        log_level: uvicorn's log level ("info" logs one line per request; never the key).

    Raises:
        TunelabError: the model is missing or not a model, or the port cannot be used.
    """
    import uvicorn

    from tunelab.inference.generate import load_run

    _check_port_free(host, port)  # before the minutes a big model may take to load
    model, tokenizer = load_run(model_path)  # raises TunelabError naming a missing or wrong folder
    name = model_name or (Path(model_path).name if Path(model_path).exists() else model_path)
    app = create_app(model, tokenizer, name, api_key)
    if host not in LOCAL_HOSTS:
        if api_key is None:
            log.warning(
                "serving on %s: anyone who can reach this address can use the model; the API has no "
                "authentication unless you pass --api-key (and it is plain HTTP either way)",
                host,
            )
        else:
            log.info("serving on %s; requests must carry the API key", host)
    log.info("serving %s at http://%s:%d/v1 (OpenAI-compatible)", name, host, port)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `tunelab serve` flags, in one place for the tunelab CLI and `python -m tunelab.inference.serve`."""
    parser.add_argument("--model", required=True, help="Run folder, model folder, .gguf file or hub id.")
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on (default: this machine only).")
    parser.add_argument("--port", type=int, default=8000, help="Port to listen on (default: 8000).")
    parser.add_argument(
        "--api-key",
        "--api_key",
        metavar="KEY",
        default=os.environ.get("TUNELAB_API_KEY"),
        help="Require 'Authorization: Bearer KEY' on every request (default: $TUNELAB_API_KEY; the environment "
        "keeps the key out of the process list).",
    )
    parser.add_argument(
        "--model-name", "--served-model-name", help="Model id shown to clients (default: the folder name)."
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m tunelab.inference.serve --model RUN_FOLDER [--host H] [--port P] [--api-key K]`."""
    parser = argparse.ArgumentParser(prog="tunelab serve", description="Serve a model over an OpenAI-compatible API.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        serve(args.model, args.host, args.port, args.api_key, args.model_name)
    except TunelabError as err:
        print(f"tunelab: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
