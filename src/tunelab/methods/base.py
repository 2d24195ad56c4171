"""What a training method declares: its name, the model it trains, and how tokenized examples become rows.

The shared machinery (data loading, model loading, the Trainer, outputs) never changes when a method is added;
a method is one file defining a `Method` plus one line in `methods/__init__.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tunelab.data.tokenize import Encoded


@dataclass
class RowStats:
    """What building the rows did to the examples, for the log and the dry run."""

    examples: int = 0
    rows: int = 0
    truncated: int = 0
    dropped: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Method:
    """A training method. `build_rows` turns tokenized examples into training rows (an Encoded, or a list of
    Encoded packed into one row) and reports what it did."""

    name: str
    summary: str
    model_kind: str
    build_rows: Callable[[list[Encoded], Any], tuple[list[Any], RowStats]]
