"""Token log-probabilities for the OpenAI-compatible API: `logprobs`/`top_logprobs` on chat completions, and
`logprobs` with `echo` on text completions (what lm-evaluation-harness's `local-completions` model asks to score
a continuation).

Each token's log-prob is the model's own (log-softmax of its logits, before temperature, top-p or any other
sampling rule), worked out with one forward pass over the prompt and the answer once the answer is made, so
streamed and whole answers, greedy or sampled, are scored the same way. A token's text is that of its own bytes
(a byte-level BPE token's, or a SentencePiece piece's with its leading space), so a character split over two
tokens shows as the bytes each holds, as OpenAI gives them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

CHAT_TOP_MAX = 20  # OpenAI's limits: top_logprobs on chat, logprobs on text completions
COMPLETIONS_TOP_MAX = 5
NO_CHANCE = -9999.0  # what OpenAI reports for a token the model gives no probability at all (JSON has no -inf)
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # a SentencePiece byte-fallback token


@dataclass
class Scored:
    """One token of a text and how likely the model found it there."""

    token: int
    logprob: float | None  # None for a text's first token: nothing comes before it to predict it from
    top: list[tuple[int, float]]  # the likeliest tokens at that place, likeliest first


def score(model: Any, ids: list[int], start: int, top: int) -> list[Scored]:
    """The tokens ids[start:], each with its log-prob given the tokens before it and the `top` likeliest there.
    start 0 scores the first token as None (a text's first token is predicted from nothing)."""
    import torch

    scored = [Scored(ids[0], None, [])] if start == 0 and ids else []
    first = max(start, 1)
    if first >= len(ids):
        return scored
    batch = torch.tensor([ids], device=model.device)
    keep = len(ids) - first + 1  # the logits of the places that predict ids[first:] (and the last, dropped)
    with torch.no_grad():
        try:
            out = model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False, logits_to_keep=keep)
        except TypeError:  # a model without logits_to_keep
            out = model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)
    logp = torch.log_softmax(out.logits[0, -keep:-1].float(), dim=-1)
    wanted = torch.tensor(ids[first:], device=logp.device)
    chosen = logp.gather(1, wanted[:, None])[:, 0].tolist()
    best = logp.topk(top, dim=-1) if top else None
    for i, token in enumerate(ids[first:]):
        pairs = list(zip(best.indices[i].tolist(), best.values[i].tolist(), strict=True)) if best is not None else []
        scored.append(Scored(token, _finite(chosen[i]), [(t, _finite(p)) for t, p in pairs]))
    return scored


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else NO_CHANCE


class TokenText:
    """Each token's own bytes and text (OpenAI's `bytes` and `token`), from the tokenizer's vocabulary."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.added = {i: str(t) for i, t in tokenizer.added_tokens_decoder.items()}
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        # byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM): each byte is written as one printable character
        self.byte_level = "ByteLevel" in type(decoder).__name__ or "ByteLevel" in repr(decoder)
        self.from_char = {c: b for b, c in _byte_characters().items()}

    def bytes_of(self, token: int) -> bytes:
        if token in self.added:  # added tokens hold their text as it is
            return self.added[token].encode("utf-8")
        piece = self.tokenizer.convert_ids_to_tokens(token) or ""
        if self.byte_level and all(c in self.from_char for c in piece):
            return bytes(self.from_char[c] for c in piece)
        if _BYTE_PIECE.fullmatch(piece):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")  # SentencePiece writes a space as U+2581

    def text_of(self, token: int) -> str:
        return self.bytes_of(token).decode("utf-8", errors="replace")


def _byte_characters() -> dict[int, str]:
    """Byte-level BPE's map of the 256 bytes to printable characters: printable Latin-1 bytes stand for
    themselves, the others for the characters from U+0100 on, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters, extra = {}, 0
    for byte in range(256):
        if byte in kept:
            characters[byte] = chr(byte)
        else:
            characters[byte] = chr(256 + extra)
            extra += 1
    return characters


def chat_logprobs(tokenizer: Any, scored: list[Scored]) -> dict[str, Any]:
    """A chat choice's `logprobs`, as OpenAI shapes them: each token's text, bytes, log-prob and top_logprobs."""
    texts = TokenText(tokenizer)

    def entry(token: int, logprob: float | None) -> dict[str, Any]:
        raw = texts.bytes_of(token)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    content = [entry(s.token, s.logprob) | {"top_logprobs": [entry(t, p) for t, p in s.top]} for s in scored]
    return {"content": content, "refusal": None}


def completion_logprobs(tokenizer: Any, scored: list[Scored], top: int, offset: int = 0) -> dict[str, Any]:
    """A text completion choice's `logprobs` (OpenAI's legacy shape): tokens, token_logprobs, top_logprobs (a
    token-to-log-prob map per place; None where there is no log-prob) and text_offset (from `offset`)."""
    texts = TokenText(tokenizer)
    tokens = [texts.text_of(s.token) for s in scored]
    offsets, at = [], offset
    for text in tokens:
        offsets.append(at)
        at += len(text)
    tops = [{texts.text_of(t): p for t, p in s.top} if s.logprob is not None and top else None for s in scored]
    return {
        "tokens": tokens,
        "token_logprobs": [s.logprob for s in scored],
        "top_logprobs": tops,
        "text_offset": offsets,
    }
