"""`sft`: supervised fine-tuning, one example per row (or packed), loss on the answer tokens.

For chat, prompt/completion and Alpaca rows only the assistant/completion tokens carry a loss (unless
completion_only_loss is off); plain-text rows are trained whole. Examples longer than block_size are truncated
(counted in the log); examples left with no answer tokens are dropped (counted too).
"""

from __future__ import annotations

from typing import Any

from tunelab.config.llm import LLMParams
from tunelab.data.packing import pack
from tunelab.data.tokenize import IGNORE, Encoded, truncate
from tunelab.methods.base import Method, RowStats


def build_rows(examples: list[Encoded], params: LLMParams) -> tuple[list[Any], RowStats]:
    if not params.completion_only_loss:
        examples = [Encoded(e.input_ids, [IGNORE, *e.input_ids[1:]]) for e in examples]
    kept, truncated, dropped = truncate(examples, params.block_size)
    stats = RowStats(examples=len(examples), truncated=truncated, dropped=dropped)
    rows: list[Any] = pack(kept, params.block_size) if params.packing else kept
    stats.rows = len(rows)
    if params.packing:
        stats.notes.append(f"{len(kept)} examples packed into {len(rows)} rows of up to {params.block_size} tokens")
    return rows, stats


METHOD = Method(
    model_kind="causal_lm",
    build_rows=build_rows,
)
