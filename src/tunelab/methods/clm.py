"""`default`: causal-language-model training on the whole text, joined and cut into block_size blocks.

This is AutoTrain's `llm` / `llm-generic` task: every token is trained, prompts included, and texts are
concatenated (each ending with EOS) so that no compute is spent on padding.
"""

from __future__ import annotations

from typing import Any

from tunelab.config.llm import LLMParams
from tunelab.data.tokenize import Encoded, group_into_blocks
from tunelab.methods.base import Method, RowStats


def build_rows(examples: list[Encoded], params: LLMParams) -> tuple[list[Any], RowStats]:
    blocks = group_into_blocks(examples, params.block_size)
    stats = RowStats(examples=len(examples), rows=len(blocks))
    stats.notes.append(
        f"{sum(len(e) for e in examples)} tokens joined into {len(blocks)} blocks of {params.block_size}"
    )
    return blocks, stats


METHOD = Method(
    model_kind="causal_lm",
    build_rows=build_rows,
)
