"""One generation streamed as text, for the OpenAI-compatible API (inference/openai_api.py) and `tunelab chat`: the
prompt's token ids checked against the model's context, then text pieces as the model produces them, stop strings
and the chat template's turn end applied, one generation at a time on the model.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from tunelab.inference.openai_requests import RequestError, Sampling
from tunelab.models.turns import turn_end
from tunelab.models.vocabulary import special_tokens


class Generation:
    """One request's generation: iterate it for text pieces as the model produces them.

    `model.generate` runs in a worker thread that holds the server's lock, so requests take turns on the model and
    the lock is released when generation ends even if the client has gone away. Stop strings are applied to the
    decoded text (the model knows only tokens): text that could be the start of a stop string is held back until
    it is clear that it is not. After iteration, finish_reason and the token counts are set.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        lock: threading.Lock,
        input_ids: Any,
        sampling: Sampling,
        keep: tuple[str, ...] = (),
        extra: dict[str, Any] | None = None,
    ) -> None:
        """keep: special tokens whose text the answer keeps (a tool-call form's markers, which some tokenizers mark
        special: decoded as usual, a call would vanish from the answer). extra: more inputs for generate (the
        pixels of the images a chat shows)."""
        self.extra = extra or {}
        self.model, self.tokenizer, self.lock, self.sampling = model, tokenizer, lock, sampling
        self.keep = keep
        self._decoder = keeping(tokenizer, keep)  # what the answer is decoded with
        self.input_ids = input_ids
        self.prompt_tokens = int(input_ids.shape[1])
        self.completion_tokens = 0
        self.finish_reason = "stop"
        self._stop = threading.Event()  # set by the reader: a stop string was seen, or the client went away
        self._error: BaseException | None = None
        self._output: Any = None
        # Generation ends at the model's EOS and at the chat template's turn-end marker (models/turns.py): a token
        # id, or text to stop at like the request's own stop strings (but never returned: not the client's).
        self._end_ids, marker = turn_end(tokenizer, model)
        self._stops = [*sampling.stop, *marker]
        self._text = ""  # the text returned, for the completion's token count
        self._stopped = False  # whether a stop string ended it

    def cancel(self) -> None:
        """Stop generating at the next token (the client went away)."""
        self._stop.set()

    def __iter__(self) -> Iterator[str]:
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self._decoder, skip_prompt=True, skip_special_tokens=True)
        worker = threading.Thread(target=self._generate, args=(streamer,), daemon=True)
        worker.start()
        text, sent, stopped = "", 0, False
        try:
            for piece in streamer:
                text += piece
                cut = min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)
                if cut >= 0:
                    stopped = True
                    self._stop.set()
                    self._text = text[:cut]
                    if text[sent:cut]:
                        yield text[sent:cut]
                    break
                safe = len(text) - _held_back(text, self._stops)
                if safe > sent:
                    yield text[sent:safe]
                    sent = safe
            else:
                self._text = text
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
        self._stopped = stopped
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
        sampling = {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k} if s.temperature > 0 else {}
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
                        eos_token_id=self._end_ids or None,
                        pad_token_id=_pad_token_id(self.tokenizer),
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([StopWhenAsked()]),
                        **sampling,
                        **self.extra,
                    )
        except BaseException as err:
            # Handed to the reader, which re-raises it; ending the stream keeps the reader from waiting forever.
            self._error = err
            streamer.end()

    def answer_ids(self, keep_end: bool = False) -> list[int]:
        """The token ids of the text returned (after iteration): the model's new tokens, less anything past a stop
        string, and less the end token it stopped at unless `keep_end` (a text completion's log-probs show it, as
        vLLM's do: lm-evaluation-harness counts on the last one being the token generated)."""
        if self._output is None:
            return []
        new = self._output[0, self.prompt_tokens :].tolist()
        if new and new[-1] in self._end_ids:
            return new if keep_end else new[:-1]
        if not self._stopped:
            return new
        # A stop string ends the text inside the tokens made: keep those up to the first whose text reaches it
        # (decoded as the streamer decoded them).
        low, high = 0, len(new)
        while low < high:
            middle = (low + high) // 2
            if len(self._decoder.decode(new[:middle], skip_special_tokens=True)) >= len(self._text):
                high = middle
            else:
                low = middle + 1
        return new[:low]

    def _count(self, stopped: bool) -> None:
        if self._output is None:
            return
        new = self._output[0, self.prompt_tokens :].tolist()
        ended = bool(new) and new[-1] in self._end_ids
        if not stopped and not ended and len(new) >= (self.sampling.max_tokens or 0):
            self.finish_reason = "length"
        # The tokens of the text returned: a stop string is seen a few tokens after the model wrote it (the
        # streamer holds back a word until it is whole), and what came after it was not the client's.
        self.completion_tokens = len(new) if not stopped else _token_count(self.tokenizer, self._text)


def keeping(tokenizer: Any, keep: tuple[str, ...]) -> Any:
    """The tokenizer to decode an answer with: one whose decoding skips special tokens but those in `keep` (the
    tokenizer itself when none of them is a special token in it, so decoding skips none of them anyway)."""
    return _Keeping(tokenizer, keep) if set(special_tokens(tokenizer).values()) & set(keep) else tokenizer


class _Keeping:
    """A tokenizer whose decoding skips special tokens but those named (the streamer's view of the tokenizer)."""

    def __init__(self, tokenizer: Any, keep: tuple[str, ...]) -> None:
        self._tokenizer = tokenizer
        self._skipped = {i for i, token in special_tokens(tokenizer).items() if token not in keep}

    def decode(self, ids: Any, **kwargs: Any) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        ids = [ids] if isinstance(ids, int) else ids  # (the streamer decodes one token alone too)
        kwargs["skip_special_tokens"] = False
        return self._tokenizer.decode([i for i in ids if i not in self._skipped], **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


def _held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of `text` could be the start of a stop string (so must wait for more)."""
    return max((n for s in stops for n in range(len(s) - 1, 0, -1) if text.endswith(s[:n])), default=0)


def _token_count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0


def _pad_token_id(tokenizer: Any) -> int | None:
    # Many causal LMs have no pad token; generate() then warns on every call. One sequence needs no padding.
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def encode_prompt(model: Any, tokenizer: Any, text: str | list[int], templated: bool, sampling: Sampling) -> Any:
    """Token ids of the prompt (a text, or token ids already) on the model's device; max_tokens checked against (or
    defaulted to) the context."""
    import torch

    if isinstance(text, list):
        from tunelab.models.vocabulary import embedding_rows

        vocabulary = embedding_rows(model)
        if not all(0 <= t < vocabulary for t in text):
            raise RequestError(
                f"prompt holds token ids outside the model's vocabulary (0 to {vocabulary - 1})", "prompt"
            )
        ids = torch.tensor([text], device=model.device)
    else:  # a chat template writes its own BOS where the model wants one (as in generate.format_prompt)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=not templated)["input_ids"].to(model.device)
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    prompt_tokens = int(ids.shape[1])
    if prompt_tokens == 0:
        raise RequestError("the prompt is empty: there is nothing to continue", "prompt")
    field = sampling.max_tokens_field
    if context is not None:
        # The wording and code clients (LiteLLM, LangChain) recognise as a context overflow, to trim and retry.
        if prompt_tokens > context or (prompt_tokens == context and sampling.max_tokens != 0):
            raise RequestError(
                f"This model's maximum context length is {context} tokens. However, your prompt is {prompt_tokens} "
                "tokens, leaving none to generate.",
                "messages" if templated else "prompt",
                "context_length_exceeded",
            )
        if sampling.max_tokens is None:
            sampling.max_tokens = context - prompt_tokens
        elif prompt_tokens + sampling.max_tokens > context:
            raise RequestError(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{prompt_tokens + sampling.max_tokens} tokens ({prompt_tokens} in the prompt, {sampling.max_tokens} "
                f"for the completion, {field}).",
                field,
                "context_length_exceeded",
            )
    if sampling.max_tokens is None:
        sampling.max_tokens = 512  # a model that does not say its context length
    return ids
