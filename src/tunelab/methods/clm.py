"""`default`: causal-language-model training on the whole text, joined and cut into block_size blocks.

This is AutoTrain's `llm` / `llm-generic` task: every token is trained, prompts included, and texts are
concatenated (each ending with EOS) so that no compute is spent on padding. The blocks are slices of the
tokenized table's token stream (data/rows.BlockRows).
"""

from __future__ import annotations

from typing import Any

from tunelab.config.llm import LLMParams
from tunelab.data.rows import BlockRows
from tunelab.data.store import TokenTable
from tunelab.methods.base import Method, RowStats


def build_rows(examples: Any, params: LLMParams) -> tuple[Any, RowStats]:
    size = params.block_size
    table = examples if isinstance(examples, TokenTable) else TokenTable.from_examples(examples, size)
    # The remainder shorter than a block is kept only when it is all there is (a tiny data set).
    count = table.tokens // size or (1 if table.tokens > 1 else 0)
    blocks = BlockRows(table, size, count)
    stats = RowStats(examples=len(table), rows=len(blocks))
    stats.notes.append(f"{table.tokens} tokens joined into {len(blocks)} blocks of {size}")
    return blocks, stats


METHOD = Method(
    model_kind="causal_lm",
    build_rows=build_rows,
)
