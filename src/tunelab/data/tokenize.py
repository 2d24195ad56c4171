"""Rendered text -> token ids and labels, with the loss mask taken from the rendered spans.

Labels are aligned with input_ids (the model shifts them): a label is the token itself where the loss counts and
-100 elsewhere. The first token of every example is -100 too, so that a packed row never asks one example to
predict the next one's first token.
"""

from __future__ import annotations

import itertools
import json
import os
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
    images: list[Any] | None = None  # the images it shows and where their tokens are (data/images.ImageSpan)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels[1:])


def encode_arrays(
    rendered: list[Rendered], tokenizer: Any, add_special_tokens: bool, marked: list | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokenize rendered texts into flat arrays: token ids end to end (int32), whether each is trained (uint8), and
    each text's token count (int32). A token is trained when one of its characters lies in a trainable span (a
    special token the tokenizer adds has none); the first token of every text never is. `marked`, when given, gets
    each text's [first, stop) token range of each of its `marks` (an image's characters)."""
    if not rendered:
        return np.zeros(0, np.int32), np.zeros(0, np.uint8), np.zeros(0, np.int32)
    texts = [r.text for r in rendered]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow tokenizer: every token's offsets, in Python
        enc = tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        id_lists = enc["input_ids"]
        pairs = zip(enc["offset_mapping"], rendered, strict=True)
        ranges = [_ranges_from_offsets(offsets, r.spans) for offsets, r in pairs]
        if marked is not None:
            pairs = zip(enc["offset_mapping"], rendered, strict=True)
            marked += [marked_from_offsets(offsets, r.marks or []) for offsets, r in pairs]
    else:
        # transformers sets the backend up for each call (no truncation or padding, its special-token splitting):
        # a call on one text does that, then the Rust tokenizer is used as it is, which skips building Python
        # lists of every token's offsets (most of the cost beyond tokenizing itself).
        tokenizer(texts[:1], add_special_tokens=add_special_tokens)
        whole = add_special_tokens or marked is not None  # (an image's range is found in the whole text)
        cuts, heads = _shared_cuts(rendered, backend) if not whole else ([0] * len(texts), {})
        pieces = [t[c:] for t, c in zip(texts, cuts, strict=True)] if heads else texts
        encodings = backend.encode_batch(pieces, add_special_tokens=add_special_tokens)
        id_lists = [heads[c] + e.ids if c else e.ids for e, c in zip(encodings, cuts, strict=True)]
        ranges = [
            _shifted(_trained_ranges(e, len(e.ids), [(s - c, t - c) for s, t in r.spans]), len(heads.get(c, ())))
            for e, c, r in zip(encodings, cuts, rendered, strict=True)
        ]
        if marked is not None:
            marked += [
                [(_trained_ranges(e, len(e.ids), [mark]) or [(0, 0)])[0] for mark in r.marks or []]
                for e, r in zip(encodings, rendered, strict=True)
            ]
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


# A block's texts often open with the same words (a template's preamble, a fixed system prompt): those are
# tokenized once, and only what follows a cut inside them is tokenized per text. That is exact when tokens never
# span the cut, which holds where the tokenizer splits text into pieces by regular expression (byte-level BPE:
# GPT-2, Llama 3, Qwen, SmolLM) with no normalizer or NFC before a plain ASCII character, and the cut is where a
# piece of the shared text starts with two whole pieces of it after (so neither the piece before the cut nor the
# expression's look-ahead reaches a text's own characters). Tokenizers that add a leading space or marker per call
# (SentencePiece's Metaspace, a prefix-space option) are left out; and a few texts of every block are tokenized
# whole too, to make sure.
SHARED_MIN_CHARS = 64
CHECKED_TEXTS = 8


def _shared_cuts(rendered: list[Rendered], backend: Any) -> tuple[list[int], dict[int, list[int]]]:
    """Where to cut each text of a block (0: not cut) and the token ids of each cut's head. Texts are grouped by
    their opening characters (a template with and without an input field opens two ways); a group's cut is a piece
    boundary inside what all its texts share, before any trained span, that tokenizing both ways on a spread of the
    group's texts confirms."""
    cuts = [0] * len(rendered)
    heads: dict[int, list[int]] = {}
    if len(rendered) < 2 * CHECKED_TEXTS or not _splits_by_pieces(backend):
        return cuts, heads
    groups: dict[str, list[int]] = {}
    for index, r in enumerate(rendered):
        groups.setdefault(r.text[:SHARED_MIN_CHARS], []).append(index)
    for members in groups.values():
        if len(members) < 2 * CHECKED_TEXTS:
            continue
        texts = [rendered[i].text for i in members]
        cut, head = _group_cut(texts, [rendered[i].spans for i in members], backend)
        if cut:
            heads.setdefault(cut, head)
            if heads[cut] != head:  # another group's head of the same length: leave this one whole
                continue
            for i in members:
                cuts[i] = cut
    return cuts, heads


def _group_cut(texts: list[str], spans: list[list[tuple[int, int]]], backend: Any) -> tuple[int, list[int]]:
    shared = os.path.commonprefix([min(texts), max(texts)])  # the sorted extremes share what all of them share
    first_span = min((start for row in spans for start, _ in row), default=len(shared))
    shared = shared[: min(len(shared), first_span)]
    if len(shared) < SHARED_MIN_CHARS:
        return 0, []
    encoding = backend.encode(shared, add_special_tokens=False)
    words = [w for w in encoding.word_ids if w is not None]
    if len(set(words)) < 4:
        return 0, []
    # Two whole pieces of shared text after the cut, which is where the piece before them ends (a start offset
    # can be trimmed past the piece's leading space; the end of the one before never is).
    before_cut = words[-1] - 3
    ends = [end for (_, end), w in zip(encoding.offsets, encoding.word_ids, strict=True) if w == before_cut]
    cut = max(ends, default=0)
    if cut <= 0 or (backend.normalizer is not None and not shared[cut].isascii()):
        return 0, []  # NFC composes a character with the marks after it: never cut before a non-ASCII one
    head = backend.encode(shared[:cut], add_special_tokens=False).ids
    step = (len(texts) - 1) / (CHECKED_TEXTS - 1)
    sample = [texts[round(i * step)] for i in range(CHECKED_TEXTS)]
    whole = backend.encode_batch(sample, add_special_tokens=False)
    parts = backend.encode_batch([t[cut:] for t in sample], add_special_tokens=False)
    exact = all(w.ids == head + p.ids for w, p in zip(whole, parts, strict=True))
    return (cut, head) if exact else (0, [])


def _splits_by_pieces(backend: Any) -> bool:
    pre, norm = backend.pre_tokenizer, backend.normalizer
    plain = norm is None or json.loads(norm.__getstate__()).get("type") == "NFC"  # NFC: Qwen's
    return plain and pre is not None and _by_pieces(json.loads(pre.__getstate__()))


def _by_pieces(state: dict) -> bool:
    kind = state.get("type")
    if kind == "Sequence":
        return all(_by_pieces(part) for part in state.get("pretokenizers", []))
    if kind == "ByteLevel":
        return not state.get("add_prefix_space", False)
    return kind in ("Split", "Digits", "Punctuation")


def _shifted(ranges: list[tuple[int, int]], by: int) -> list[tuple[int, int]]:
    return [(first + by, stop + by) for first, stop in ranges] if by else ranges


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


def marked_from_offsets(offsets: list, marks: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Each mark's [first, stop) token range, from every token's offsets (a slow tokenizer's)."""
    out = []
    for start, end in marks:
        meeting = [i for i, chars in enumerate(offsets) if _meets(tuple(chars), start, end)]
        out.append((meeting[0], meeting[-1] + 1) if meeting else (0, 0))
    return out


def _ranges_from_offsets(offsets: list, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    trained = [any(_meets(tuple(chars), s, e) for s, e in spans) for chars in offsets]
    return [(i, i + 1) for i, flag in enumerate(trained) if flag]
