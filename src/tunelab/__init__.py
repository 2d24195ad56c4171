"""tunelab: fine-tune LLMs on your own data from the CLI, a config file or Python.

    import tunelab
    params = tunelab.LLMParams(model="HuggingFaceTB/SmolLM2-135M-Instruct", data_path="samples/alpaca.jsonl",
                               trainer="sft", peft=True, project_name="my-run")
    print(tunelab.plan(params).render())   # the dry run: checks, rows, token lengths, memory estimate
    folder = tunelab.train(params)

Text classification: `tunelab.train(tunelab.TextClassificationParams(...))`, or a config with
`task: text_classification`.

The package, in the order a run flows through it (config -> data -> model -> trainer -> outputs):

    config/      the parameters: one dataclass per task, AutoTrain's config schema and spellings, load_config
    data/        files -> checked rows -> formatted text -> token ids and labels (text, chats, pairs, labels)
    models/      the base model: resolved (hub id, folder, .gguf), checked from its config, loaded, LoRA added
    methods/     the training methods (default, sft, reward, dpo, orpo, simpo, grpo): a file each + a registry line
    speed/       the hot path: the switch table, the chunked loss, fused layers, LoRA dropout
    training/    transformers' Trainer made safe and fast: batches, loss, checkpoints, progress
    tasks/       one spine per task (llm, text_classification) and the dispatcher: train, plan (dry run)
    outputs.py   the run folder: written atomically, read back by everything after training
    inference/   after training: generate, chat, serve, score, predict, evaluate, merge, export
    app/         the web app, on the same engine (it runs the CLI)
    cli.py       the `tunelab` command;  env.py, launch.py, memory.py, metrics.py, hub.py, errors.py: leaves

The public API is this module's: train, plan, load_config, the parameter classes and the errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.config import DEFAULT_MODEL, LLMParams, TextClassificationParams, load_config
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
    from tunelab import tasks

    return tasks.train(load_config(params if params is not None else {}, **overrides))


def plan(params: LLMParams | TextClassificationParams | dict[str, Any] | str | Path | None = None, **overrides: Any):
    """What `train` would do with the same arguments, checked and planned without training or writing anything.

    Returns a `tunelab.tasks.dry_run.RunPlan` (`.render()` is what `--dry-run` prints). Raises TunelabError as
    `train` would.
    """
    from tunelab import tasks

    return tasks.plan(load_config(params if params is not None else {}, **overrides))
