"""tunelab: fine-tune LLMs on your own data from the CLI, a config file or Python.

import tunelab
params = tunelab.LLMParams(model="HuggingFaceTB/SmolLM2-135M-Instruct", data_path="samples/alpaca.jsonl",
                           trainer="sft", peft=True, project_name="my-run")
folder = tunelab.train(params)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.config import load_config
from tunelab.config.schema import DEFAULT_MODEL, LLMParams
from tunelab.errors import ConfigError, DataError, TunelabError

__all__ = ["DEFAULT_MODEL", "ConfigError", "DataError", "LLMParams", "TunelabError", "load_config", "train"]
__version__ = "0.1.0"


def train(params: LLMParams | dict[str, Any] | str | Path | None = None, **overrides: Any) -> Path:
    """Fine-tune as `params` says (an LLMParams, a dict or a config path, plus keyword overrides).

    Returns the finished run folder. Raises TunelabError (with a message naming the problem) on bad input.
    """
    from tunelab.run import run

    resolved = load_config(params if params is not None else {}, **overrides)
    return run(resolved)
