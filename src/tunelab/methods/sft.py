"""`sft`: supervised fine-tuning, one example per row (or packed), loss on the answer tokens.

For chat, prompt/completion and Alpaca rows only the assistant/completion tokens carry a loss (unless
completion_only_loss is off); plain-text rows are trained whole. Examples longer than block_size are truncated
(counted in the log); examples left with no answer tokens are dropped (counted too). The rows are views onto the
tokenized table (data/rows.py): deciding them reads the per-example counts, never the tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tunelab.config.llm import LLMParams
from tunelab.data.rows import ExampleRows, PackedRows, best_fit_rows
from tunelab.data.store import TokenTable
from tunelab.methods.base import Method, RowStats


def build_rows(examples: Any, params: LLMParams) -> tuple[Any, RowStats]:
    size = params.block_size
    table = examples if isinstance(examples, TokenTable) else TokenTable.from_examples(examples, size)
    whole = not params.completion_only_loss
    kept_lengths = np.minimum(table.lengths, size)
    assert table.window == size, "internal: the table was written for another block_size"
    trained = kept_lengths - 1 if whole else table.trained_heads
    keep = np.flatnonzero(trained > 0)
    stats = RowStats(examples=len(table), truncated=int((table.lengths > size).sum()), dropped=len(table) - len(keep))
    if table.images is not None:  # a cut falls before an image it would split: that image is not trained on
        cut = sum(1 for spans in table.images if spans and spans[-1].start + spans[-1].count > size)
        if cut:
            stats.notes.append(
                f"{cut} examples lose an image to the cut at block_size={size} (with what follows it): raise "
                "block_size, or have an image take fewer tokens (image_max_pixels, for Qwen2-VL's family)"
            )
    rows: Any = ExampleRows(table, keep, size, whole)
    if params.packing:
        packed = PackedRows(rows, *best_fit_rows(rows.lengths(), size))
        stats.notes.append(f"{len(rows)} examples packed into {len(packed)} rows of up to {size} tokens")
        rows = packed
    stats.rows = len(rows)
    return rows, stats


METHOD = Method(
    model_kind="causal_lm",
    build_rows=build_rows,
    images=True,
)
