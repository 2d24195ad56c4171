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

import dataclasses
import importlib
import os
import tempfile
from pathlib import Path
from types import ModuleType

from tunelab import user_code
from tunelab.config.base import RunParams
from tunelab.errors import ConfigError, TunelabError
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
    if wants_launch(params):
        _user_functions_travel(params)  # what train would refuse before launching, the dry run says too
    return spine(params).plan(params)


def train(params: RunParams, argv: list[str] | None = None) -> Path:
    """Train as the parameters say and return the finished run folder.

    With num_processes / num_machines above 1 (and not already inside a launched process) the checks run once here,
    then the same job runs in several processes through accelerate: the CLI re-launches its own arguments (`argv`),
    the Python API a flat config written from the parameters (the token travels in the environment, never in a
    file; functions handed over as rewards or tools travel as the names they are imported by).
    """
    if user_code.importing_user_code():
        raise ConfigError(
            "tunelab.train was called while a reward's or a tool's file was imported for its functions: put the "
            'script\'s training under `if __name__ == "__main__":`'
        )
    if not wants_launch(params):
        return spine(params).run(params)
    travel_env = _user_functions_travel(params)
    check(params)  # each launched process would fail alike on a bad input: fail once, here
    if argv is not None:
        code = launch(params, argv, travel_env or None)
    else:
        env = {"HF_TOKEN": params.token} if params.token else {}
        env.update(travel_env)
        with tempfile.TemporaryDirectory(prefix="tunelab-launch-") as tmp:
            config = Path(tmp) / "config.yaml"
            _write_flat_config(params, config)
            code = launch(params, ["--config", str(config)], env or None)
    if code:
        raise TunelabError(f"the distributed run failed (exit code {code}; the processes' messages are above)")
    return Path(os.path.expanduser(params.project_name)).absolute()


def _user_functions_travel(params: RunParams) -> dict[str, str]:
    """The rewards' and tools' functions, which each launched process imports by their specs: ConfigError for one
    handed to the Python API that they could not reach; the environment that lets them find the modules found from
    here (PYTHONPATH)."""
    specs = []
    for field in dataclasses.fields(params):
        if field.metadata.get("functions") and getattr(params, field.name):
            specs += [spec.strip() for spec in getattr(params, field.name).split(",")]
    for spec in specs:
        problem = user_code.launch_problem(spec)
        if problem:
            raise ConfigError(f"with several processes: {problem}")
    roots = user_code.import_roots(specs)  # (package.module.function found from here: from there too)
    if not roots:
        return {}
    return {"PYTHONPATH": os.pathsep.join([*roots, *filter(None, [os.environ.get("PYTHONPATH")])])}


def _write_flat_config(params: RunParams, path: Path) -> None:
    import yaml

    values = params.to_dict(redact=True)
    values.pop("token", None)
    if params.task != "llm":
        values["task"] = params.task
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
