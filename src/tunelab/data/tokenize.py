"""Rendered text -> token ids and labels, with the loss mask taken from the rendered spans.

Labels are aligned with input_ids (the model shifts them): a label is the token itself where the loss counts and
-100 elsewhere. The first token of every example is -100 too, so that a packed row never asks one example to
predict the next one's first token.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from tunelab.data.templates import Rendered

IGNORE = -100


@dataclass
class Encoded:
    """One tokenized example."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels[1:])


def encode_arrays(
    rendered: list[Rendered], tokenizer: Any, add_special_tokens: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokenize rendered texts into flat arrays: token ids end to end (int32), whether each is trained (uint8), and
    each text's token count (int32). A token is trained when one of its characters lies in a trainable span (a
    special token the tokenizer adds has none); the first token of every text never is."""
    if not rendered:
        return np.zeros(0, np.int32), np.zeros(0, np.uint8), np.zeros(0, np.int32)
    texts = [r.text for r in rendered]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow tokenizer: every token's offsets, in Python
        enc = tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        id_lists = enc["input_ids"]
        pairs = zip(enc["offset_mapping"], rendered, strict=True)
        ranges = [_ranges_from_offsets(offsets, r.spans) for offsets, r in pairs]
    else:
        # transformers sets the backend up for each call (no truncation or padding, its special-token splitting):
        # a call on one text does that, then the Rust tokenizer is used as it is, which skips building Python
        # lists of every token's offsets (most of the cost beyond tokenizing itself).
        tokenizer(texts[:1], add_special_tokens=add_special_tokens)
        encodings = backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        id_lists = [e.ids for e in encodings]
        triples = zip(encodings, id_lists, rendered, strict=True)
        ranges = [_trained_ranges(e, len(ids), r.spans) for e, ids, r in triples]
    lengths = np.fromiter((len(ids) for ids in id_lists), dtype=np.int32, count=len(rendered))
    ids = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int32, count=int(lengths.sum()))
    starts = np.zeros(len(rendered), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    marks = np.zeros(len(ids) + 1, dtype=np.int32)
    for base, row_ranges in zip(starts.tolist(), ranges, strict=True):
        for first, stop in row_ranges:
            marks[base + first] += 1
            marks[base + stop] -= 1
    trained = np.cumsum(marks[:-1]) > 0
    trained[starts[lengths > 0]] = False
    return ids, trained.astype(np.uint8), lengths


def _trained_ranges(encoding: Any, count: int, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The [first, stop) token ranges whose characters meet each span, found from the span's ends.

    Token offsets only grow along a text, so the tokens meeting [start, end) are those from the one holding the
    span's first covered character to the one holding its last; neighbours that share those characters (byte
    fallback splits one character into several tokens) are taken in too."""
    out = []
    for start, end in spans:
        first = _token_of_some_char(encoding, range(start, end))
        if first is None:
            continue
        last = _token_of_some_char(encoding, range(end - 1, start - 1, -1))  # the span has a token: found too
        while first > 0 and _meets(encoding.token_to_chars(first - 1), start, end):
            first -= 1
        while last + 1 < count and _meets(encoding.token_to_chars(last + 1), start, end):
            last += 1
        out.append((first, last + 1))
    return out


def _token_of_some_char(encoding: Any, chars: range) -> int | None:
    """The token holding the first of `chars` that some token holds (trimmed whitespace belongs to none)."""
    for char in chars:
        token = encoding.char_to_token(char)
        if token is not None:
            return token
    return None


def _meets(chars: tuple[int, int] | None, start: int, end: int) -> bool:
    return chars is not None and chars[1] > chars[0] and chars[0] < end and chars[1] > start


def _ranges_from_offsets(offsets: list, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    trained = [any(_meets(tuple(chars), s, e) for s, e in spans) for chars in offsets]
    return [(i, i + 1) for i, flag in enumerate(trained) if flag]
