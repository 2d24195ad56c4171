"""The training methods tunelab knows. The CLI, the config checks and the docs enumerate this dict."""

from __future__ import annotations

from tunelab.methods import clm, dpo, orpo, reward, sft
from tunelab.methods.base import Method, RowStats

METHODS: dict[str, Method] = {
    "default": clm.METHOD,
    "sft": sft.METHOD,
    "reward": reward.METHOD,
    "dpo": dpo.METHOD,
    "orpo": orpo.METHOD,
}

__all__ = ["METHODS", "Method", "RowStats"]
