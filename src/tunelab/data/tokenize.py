"""Rendered text -> token ids and labels, with the loss mask taken from the rendered spans.

Labels are aligned with input_ids (the model shifts them): a label is the token itself where the loss counts and
-100 elsewhere. The first token of every example is -100 too, so that a packed row never asks one example to
predict the next one's first token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


def encode(rendered: list[Rendered], tokenizer: Any, add_special_tokens: bool, batch: int = 1000) -> list[Encoded]:
    """Tokenize rendered texts; a token is trained when its characters fall inside a trainable span."""
    out: list[Encoded] = []
    for start in range(0, len(rendered), batch):
        chunk = rendered[start : start + batch]
        enc = tokenizer(
            [r.text for r in chunk],
            add_special_tokens=add_special_tokens,
            return_offsets_mapping=True,
            return_attention_mask=False,
        )
        for r, ids, offsets in zip(chunk, enc["input_ids"], enc["offset_mapping"], strict=True):
            labels = [tok if _inside(span, r.spans) else IGNORE for tok, span in zip(ids, offsets, strict=True)]
            if labels:
                labels[0] = IGNORE
            out.append(Encoded(list(ids), labels))
    return out


def _inside(offset: tuple[int, int], spans: list[tuple[int, int]]) -> bool:
    begin, end = offset
    if end <= begin:  # special tokens added by the tokenizer have no characters
        return False
    return any(begin < stop and end > start for start, stop in spans)


def truncate(examples: list[Encoded], block_size: int) -> tuple[list[Encoded], int, int]:
    """Cut examples to block_size tokens; drop those left with nothing to learn. Returns (kept, cut, dropped)."""
    kept, cut, dropped = [], 0, 0
    for example in examples:
        if len(example) > block_size:
            cut += 1
            example = Encoded(example.input_ids[:block_size], example.labels[:block_size])
        if example.trained_tokens == 0:
            dropped += 1
            continue
        kept.append(example)
    return kept, cut, dropped


def group_into_blocks(examples: list[Encoded], block_size: int) -> list[Encoded]:
    """Causal-LM rows: all token streams joined and cut into block_size pieces, every token trained.

    The remainder shorter than a block is kept only when it is all there is (a tiny data set).
    """
    stream: list[int] = [tok for example in examples for tok in example.input_ids]
    blocks = [stream[i : i + block_size] for i in range(0, len(stream), block_size)]
    if len(blocks) > 1 and len(blocks[-1]) < block_size:
        blocks.pop()
    return [Encoded(block, [IGNORE, *block[1:]]) for block in blocks if len(block) > 1]
