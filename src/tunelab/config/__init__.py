"""Parameters: a config file, a dict or CLI flags -> one validated parameter object per run.

`load_config` is the single entry of the Python API, the CLI and the web app. The parameter classes are
config/llm.py (LLMParams) and config/text_classification.py (TextClassificationParams), on what config/base.py
gives both; AutoTrain's config schema and spellings are read by config/autotrain.py and config/aliases.py; the
merging of sources and the name checks are config/overrides.py; docs/config.md is written by config/docs.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from tunelab.config.autotrain import expand_env, from_autotrain_config, is_autotrain_config
from tunelab.config.base import DEFAULT_MODEL, Params, RunParams
from tunelab.config.llm import LLMParams
from tunelab.config.overrides import build_params, normalize_keys, params_class
from tunelab.config.text_classification import TextClassificationParams
from tunelab.errors import ConfigError

__all__ = [
    "DEFAULT_MODEL",
    "LLMParams",
    "Params",
    "RunParams",
    "TextClassificationParams",
    "load_config",
    "read_config_file",
    "split_task",
]


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a YAML (or JSON) config file, either dialect, into parameter keyword arguments (plus its `task`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: {_yaml_problem(err)}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not a UTF-8 text file (byte {err.object[err.start]:#x}); save it as UTF-8"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of parameters at the top level")
    return to_param_dict(raw, str(path))


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: where it is and what is wrong (PyYAML's own message spans several)."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = " ".join(str(getattr(err, "problem", None) or err).split())
    hint = "; YAML indents with spaces, not tabs" if "'\\t'" in problem else ""
    return f"{where}not valid YAML ({problem}{hint})"


def to_param_dict(raw: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Either an AutoTrain-schema dict or a flat dict of tunelab parameter names -> parameter kwargs.

    A text-classification config keeps its `task` key so that `load_config` picks the right class."""
    schema = params_class(raw.get("task"))
    if is_autotrain_config(raw):
        values = from_autotrain_config(raw, source)
    else:
        values = {key: expand_env(value) for key, value in normalize_keys(raw, source, schema).items()}
    if schema is not LLMParams:
        values["task"] = raw["task"]
    return values


def split_task(values: dict[str, Any]) -> tuple[type, dict[str, Any]]:
    """(parameter class, its keyword arguments) from a to_param_dict result."""
    values = dict(values)
    return params_class(values.pop("task", None)), values


def load_config(config: str | os.PathLike | dict[str, Any] | Params, **overrides: Any) -> Any:
    """One validated parameter object (LLMParams, or TextClassificationParams for that task) from a config path,
    a dict (either dialect) or a parameter object, plus keyword overrides.

    Example:
        >>> params = load_config("config.yaml", max_steps=10)
    """
    if isinstance(config, Params):
        schema, base = type(config), config.to_dict(redact=False)
    else:
        raw = to_param_dict(config) if isinstance(config, dict) else read_config_file(config)
        schema, base = split_task(raw)
    return build_params(base, normalize_keys(overrides, "argument", schema), schema=schema)
