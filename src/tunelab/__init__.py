"""tunelab: fine-tune LLMs on your own data from the CLI, a config file or Python.

import tunelab
params = tunelab.LLMParams(model="HuggingFaceTB/SmolLM2-135M-Instruct", data_path="samples/alpaca.jsonl",
                           trainer="sft", peft=True, project_name="my-run")
print(tunelab.plan(params).render())   # the dry run: checks, rows, token lengths, memory estimate
folder = tunelab.train(params)

Text classification: `tunelab.train(tunelab.TextClassificationParams(...))`, or a config with
`task: text_classification`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.config import load_config
from tunelab.config.schema import DEFAULT_MODEL, LLMParams
from tunelab.config.text_classification import TextClassificationParams
from tunelab.errors import ConfigError, DataError, TunelabError

__all__ = [
    "DEFAULT_MODEL",
    "ConfigError",
    "DataError",
    "LLMParams",
    "TextClassificationParams",
    "TunelabError",
    "load_config",
    "plan",
    "train",
]
__version__ = "0.1.0"


def train(
    params: LLMParams | TextClassificationParams | dict[str, Any] | str | Path | None = None, **overrides: Any
) -> Path:
    """Fine-tune as `params` says (a parameter object, a dict or a config path, plus keyword overrides).

    Returns the finished run folder. Raises TunelabError (with a message naming the problem) on bad input.
    """
    resolved = load_config(params if params is not None else {}, **overrides)
    from tunelab.launch import launch_params, wants_launch

    if wants_launch(resolved):  # num_processes > 1: the same run in several processes, through accelerate
        return launch_params(resolved)
    if isinstance(resolved, TextClassificationParams):
        from tunelab.classify import run_text_classification

        return run_text_classification(resolved)
    from tunelab.run import run

    return run(resolved)


def plan(params: LLMParams | TextClassificationParams | dict[str, Any] | str | Path | None = None, **overrides: Any):
    """What `train` would do with the same arguments, checked and planned without training or writing anything.

    Returns a `tunelab.dry_run.RunPlan` (`.render()` is what `--dry-run` prints). Raises TunelabError as `train` would.
    """
    from tunelab.dry_run import plan as make_plan

    return make_plan(load_config(params if params is not None else {}, **overrides))
