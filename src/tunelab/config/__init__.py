"""Turning a config file, a dict or CLI flags into one validated LLMParams.

`load_config` is the single entry used by the CLI, the Python API and (later) the web app.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from tunelab.config.autotrain import expand_env, from_autotrain_config, is_autotrain_config, normalize_keys, schema_of
from tunelab.config.overrides import build_params
from tunelab.config.schema import DEFAULT_MODEL, LLMParams, Params
from tunelab.errors import ConfigError

__all__ = ["DEFAULT_MODEL", "LLMParams", "load_config", "read_config_file"]


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a YAML (or JSON) config file into LLMParams keyword arguments, either dialect."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of parameters at the top level")
    return to_param_dict(raw, str(path))


def to_param_dict(raw: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Either an AutoTrain-schema dict or a flat dict of tunelab parameter names -> parameter kwargs.

    A text-classification config keeps its `task` key so that `load_config` picks the right class."""
    if is_autotrain_config(raw):
        values = from_autotrain_config(raw, source)
    else:
        values = {key: expand_env(value) for key, value in normalize_keys(raw, source).items()}
    if schema_of(raw) is not LLMParams:
        values["task"] = raw["task"]
    return values


def split_task(values: dict[str, Any]) -> tuple[type, dict[str, Any]]:
    """(parameter class, its keyword arguments) from a to_param_dict result."""
    values = dict(values)
    return schema_of({"task": values.pop("task", None)}), values


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
