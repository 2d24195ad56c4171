"""The training methods tunelab knows. The CLI, the config checks and the docs enumerate this registry.

A method is one module in this package defining `METHOD` plus one line in `REGISTRY`. Modules are imported
only when their method is used: the preference methods subclass transformers' Trainer, and `tunelab --help`
should not pay seconds of imports for them.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping

from tunelab.methods.base import Method, RowStats

# name -> (module in this package, one-line summary for --help and the docs)
REGISTRY: dict[str, tuple[str, str]] = {
    "default": ("clm", "causal LM over the whole text, joined and cut into blocks of block_size"),
    "sft": ("sft", "supervised fine-tuning per example (optionally packed), loss on answer tokens"),
    "reward": ("reward", "reward model (sequence classifier, one score) trained on chosen/rejected pairs"),
    "dpo": ("dpo", "direct preference optimization on prompt/chosen/rejected pairs (sigmoid loss, dpo_beta)"),
    "orpo": ("orpo", "odds ratio preference optimization on prompt/chosen/rejected pairs (no reference model)"),
}


class _Methods(Mapping[str, Method]):
    """`METHODS[name]` imports the method's module on first use."""

    def __getitem__(self, name: str) -> Method:
        module, _ = REGISTRY[name]
        return importlib.import_module(f"tunelab.methods.{module}").METHOD

    def __iter__(self) -> Iterator[str]:
        return iter(REGISTRY)

    def __len__(self) -> int:
        return len(REGISTRY)


METHODS: Mapping[str, Method] = _Methods()
SUMMARIES: dict[str, str] = {name: summary for name, (_, summary) in REGISTRY.items()}

__all__ = ["METHODS", "SUMMARIES", "Method", "RowStats"]
