"""Mixtures: `data_path` listing several sources, each prepared on its own, then sampled into one training set.

    data_path:
      - data/instructions.jsonl                      # all of it
      - path: data/chat.jsonl                        # 10% of it, its own columns and template
        fraction: 0.1
        text_column: conversations
        chat_template: chatml
      - path: data/small-but-good.csv
        weight: 3                                    # upsampled: every row three times

A source is a path (file, folder or hub id) or a mapping with `path` and any of: `split` (its train split),
`valid_split`, `text_column`, `prompt_text_column`, `chat_template` (each defaults to the run's own), and
`fraction` (0 < f <= 1: that share of its examples, drawn with the run's seed) or `weight` (w > 0: w copies, the
fraction part drawn). Each source is read, checked and tokenized with its own row format and template
(data.load_data), its examples are drawn, and the drawn ones are written into the run's training table in source
order (the Trainer shuffles). Validation splits are taken whole. The first source's template is the one saved
with the model (chat and serve use it).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.errors import ConfigError

# A source's own key -> the run parameter it sets for that source.
PER_SOURCE = {
    "split": "train_split",
    "valid_split": "valid_split",
    "text_column": "text_column",
    "prompt_text_column": "prompt_text_column",
    "chat_template": "chat_template",
}
SOURCE_KEYS = ("path", *PER_SOURCE, "fraction", "weight")


@dataclass(frozen=True)
class Source:
    """One entry of a mixture: where it is, what of the run's settings it changes, and how much of it to take."""

    path: str
    settings: tuple[tuple[str, Any], ...] = ()  # (LLMParams field, value) pairs this source sets
    fraction: float | None = None
    weight: float | None = None

    def params(self, params: Any) -> Any:
        """The run's parameters as they read this source."""
        return dataclasses.replace(params, data_path=self.path, **dict(self.settings))

    def describe(self) -> str:
        if self.fraction is not None:
            return f"{self.path} (fraction {self.fraction:g})"
        return f"{self.path} (weight {self.weight:g})" if self.weight is not None else self.path


def is_mixture(data_path: Any) -> bool:
    return isinstance(data_path, (list, tuple))


def parse_sources(data_path: Any) -> list[Source]:
    """The sources of a data_path list; a mistake in one is a ConfigError naming its place in the list."""
    if not data_path:
        raise ConfigError("data_path: the list of sources is empty")
    sources = []
    for number, item in enumerate(data_path, start=1):
        where = f"data_path item {number}"
        if isinstance(item, (str, Path)):
            sources.append(Source(str(item)))
            continue
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected a path or a mapping with `path`, got {type(item).__name__}")
        unknown = [key for key in item if key not in SOURCE_KEYS]
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r} (use {', '.join(SOURCE_KEYS)})")
        if not isinstance(item.get("path"), str) or not item["path"]:
            raise ConfigError(f"{where}: `path` is required (a file, a folder or a hub dataset id)")
        fraction, weight = item.get("fraction"), item.get("weight")
        if fraction is not None and weight is not None:
            raise ConfigError(f"{where}: give `fraction` (take a share) or `weight` (repeat), not both")
        if fraction is not None and not (_number(fraction) and 0 < fraction <= 1):
            raise ConfigError(f"{where}: fraction must be a number above 0 and at most 1, got {fraction!r}")
        if weight is not None and not (_number(weight) and weight > 0):
            raise ConfigError(f"{where}: weight must be a number above 0, got {weight!r}")
        for key in ("split", "text_column"):  # null valid_split (no validation) or chat_template (auto) is a choice
            if key in item and item[key] is None:
                raise ConfigError(f"{where}: {key}: a value is required (leave the key out to use the run's own)")
        settings = tuple((PER_SOURCE[key], item[key]) for key in PER_SOURCE if key in item)
        for key, value in settings:
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{where}: {key} must be text, got {value!r}")
        sources.append(Source(item["path"], settings, fraction, weight))
    return sources


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def draw(count: int, source: Source, rng: np.random.Generator) -> np.ndarray:
    """The examples (indices into a source's `count`) a mixture takes: all, a drawn share, or repeats of all plus
    a drawn share for the fractional part of a weight; in source order."""
    share = source.fraction if source.fraction is not None else source.weight if source.weight is not None else 1.0
    whole, part = int(share), share - int(share)
    taken = [np.arange(count)] * whole
    if part > 0:
        picked = max(1, round(part * count)) if count else 0
        taken.append(np.sort(rng.choice(count, size=picked, replace=False)))
    return np.concatenate(taken) if taken else np.zeros(0, dtype=np.int64)
