"""The tasks tunelab trains, one spine each, and the one place that picks the spine for a parameter object.

    tasks/llm.py                  causal LMs: every method of tunelab.methods (default, sft, dpo, grpo, ...)
    tasks/text_classification.py  sequence classifiers on labelled texts
    tasks/dry_run.py              what the spines' plans share (RunPlan, steps, marked examples, memory)

Each spine has `prepare(params)` (every check, writing nothing), `plan(params)` (the dry run) and `run(params)`
(train, return the finished run folder). A parameter class names its spine in its `task` constant, so a new task
is a params class, a spine module here, and nothing else. The CLI, the Python API and the web app (through the
CLI) call `train` and `plan` below; nothing else chooses a spine or decides between running and launching.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path
from types import ModuleType

from tunelab.config.base import RunParams
from tunelab.errors import TunelabError
from tunelab.launch import launch, wants_launch

__all__ = ["check", "plan", "spine", "train"]


def spine(params: RunParams) -> ModuleType:
    """The module that runs these parameters (tunelab.tasks.<params.task>), imported when first asked for."""
    return importlib.import_module(f"tunelab.tasks.{params.task}")


def check(params: RunParams) -> None:
    """Every check a run makes before it loads weights (folder, machine, model, data), writing nothing."""
    spine(params).prepare(params)


def plan(params: RunParams):  # -> tasks.dry_run.RunPlan (not imported here: it would load the data code)
    """The dry run of these parameters: a RunPlan whose `render()` is what `--dry-run` prints."""
    return spine(params).plan(params)


def train(params: RunParams, argv: list[str] | None = None) -> Path:
    """Train as the parameters say and return the finished run folder.

    With num_processes / num_machines above 1 (and not already inside a launched process) the checks run once here,
    then the same job runs in several processes through accelerate: the CLI re-launches its own arguments (`argv`),
    the Python API a flat config written from the parameters (the token travels in the environment, never in a
    file).
    """
    if not wants_launch(params):
        return spine(params).run(params)
    check(params)  # each launched process would fail alike on a bad input: fail once, here
    if argv is not None:
        code = launch(params, argv)
    else:
        with tempfile.TemporaryDirectory(prefix="tunelab-launch-") as tmp:
            config = Path(tmp) / "config.yaml"
            _write_flat_config(params, config)
            code = launch(params, ["--config", str(config)], {"HF_TOKEN": params.token} if params.token else None)
    if code:
        raise TunelabError(f"the distributed run failed (exit code {code}; the processes' messages are above)")
    return Path(os.path.expanduser(params.project_name)).absolute()


def _write_flat_config(params: RunParams, path: Path) -> None:
    import yaml

    values = params.to_dict(redact=True)
    values.pop("token", None)
    if params.task != "llm":
        values["task"] = params.task
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
