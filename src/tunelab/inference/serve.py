"""`tunelab serve --model RUN_FOLDER`: one model over an OpenAI-compatible HTTP API (inference/openai_api.py).

`OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="x")` then works unchanged. The model is loaded with
`load_run`, so a run folder answers chat requests through the chat template it was trained with. There is one
model and one device, so requests are generated one at a time.

This module is what the CLI imports to build its parser: FastAPI, uvicorn and torch are imported only when a
server starts, so `tunelab --help` stays fast. `python -m tunelab.inference.serve` runs it alone.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.inference.reasoning import PARSERS
from tunelab.inference.tool_calls import FORMS

log = logging.getLogger("tunelab")

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def check_port_free(host: str, port: int) -> None:
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
    tool_call_parser: str = "auto",
    reasoning_parser: str = "think",
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
        tool_call_parser: The form the model writes tool calls in ("hermes", "mistral", "llama3_json"), or "auto":
            the form its chat template writes them in.
        reasoning_parser: "think" (or vLLM's names for the same form, "deepseek_r1", "qwen3"): reasoning written
            inside <think>...</think> before the answer is returned apart, as `reasoning`; "none": as written.

    Raises:
        TunelabError: the model is missing or not a model, or the port cannot be used.
    """
    import uvicorn

    from tunelab.inference.generate import load_run, saved_processor
    from tunelab.inference.openai_api import create_app
    from tunelab.models.vision import reads_images

    if api_key is not None and not api_key.strip():
        # An empty key would let `Authorization: Bearer ` through while the log says requests need the key.
        raise TunelabError(
            "the API key is empty (--api-key '' or TUNELAB_API_KEY set to nothing): give a key, or leave both unset "
            "to serve without one"
        )
    check_port_free(host, port)  # before the minutes a big model may take to load
    model, tokenizer = load_run(model_path)  # raises TunelabError naming a missing or wrong folder
    processor = saved_processor(model_path) if reads_images(model.config) else None
    # resolve(): `--model .` is named after the folder, not "".
    name = model_name or (Path(model_path).resolve().name if Path(model_path).exists() else model_path)
    app = create_app(model, tokenizer, name, api_key, tool_call_parser, reasoning_parser, processor)
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
    parser.add_argument(
        "--tool-call-parser",
        choices=("auto", *FORMS),
        default="auto",
        help="How the model writes tool calls, read back into OpenAI's tool_calls: hermes (<tool_call> JSON; Qwen, "
        "Hermes, tunelab's chatml), mistral ([TOOL_CALLS]), llama3_json (a JSON answer; Llama 3.1-3.3). "
        "Default auto: the form the model's chat template writes.",
    )
    parser.add_argument(
        "--reasoning-parser",
        choices=PARSERS,
        default="think",
        help="How the model writes its reasoning: think (also deepseek_r1, qwen3: <think>...</think> before the "
        "answer, returned apart as message.reasoning and reasoning_content; an answer without it is all content), "
        "or none (answers as written). Default think.",
    )


def serve_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """serve()'s arguments, from the flags add_arguments defines."""
    names = ("host", "port", "api_key", "model_name", "tool_call_parser", "reasoning_parser")
    return {"model_path": args.model} | {name: getattr(args, name) for name in names}


def main(argv: list[str] | None = None) -> int:
    """`python -m tunelab.inference.serve --model RUN_FOLDER [--host H] [--port P] [--api-key K]`."""
    parser = argparse.ArgumentParser(prog="tunelab serve", description="Serve a model over an OpenAI-compatible API.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        serve(**serve_arguments(args))
    except TunelabError as err:
        print(f"tunelab: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
