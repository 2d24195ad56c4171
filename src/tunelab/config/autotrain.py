"""AutoTrain Advanced's config schema, read into tunelab's flat parameter names.

AutoTrain users write config YAML as task / base_model / project_name / log / backend / data{...} / params{...} /
hub{...}. `from_autotrain_config` flattens it into a dict of parameter names (its spellings applied from
config/aliases.py), which config/overrides.build_params turns into the parameter object; `${NAME}` values are
taken from the environment, as AutoTrain's loader does.
"""

from __future__ import annotations

import os
import re
from typing import Any

from tunelab.config.aliases import CLASSIFICATION_TASKS, TASKS, VLM_TASKS, VLM_TRAINERS
from tunelab.config.base import field_names
from tunelab.config.overrides import Unset, check_known, normalize_keys, params_class
from tunelab.errors import ConfigError

# AutoTrain `backend` values that mean "somewhere else": tunelab always trains on this machine and says so.
LOCAL_BACKENDS = ("local", "local-cli", "local-ui", None)

_ENV = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")


def expand_env(value: Any) -> Any:
    """`${NAME}` -> the environment's NAME, as AutoTrain's config loader does; an unset (or empty) NAME gives
    `Unset(NAME)`, which build_params turns into None where a parameter may be unset, and into an error naming
    the variable where it may not."""
    if isinstance(value, str):
        match = _ENV.match(value.strip())
        if match:
            return os.environ.get(match.group(1)) or Unset(match.group(1))
    return value


def from_autotrain_config(config: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Flatten an AutoTrain-schema YAML (already parsed) into LLMParams keyword arguments.

    Raises ConfigError naming the key for anything it cannot map, so nothing a user wrote is silently ignored.
    """
    config = dict(config)
    task = config.pop("task", "llm")
    if not isinstance(task, str):
        raise ConfigError(f"{source}: task must be a task name (llm-sft, text_classification, ...), got {task!r}")
    schema = params_class(task)
    out: dict[str, Any] = {}
    if task in TASKS:
        out["trainer"] = TASKS[task]
    elif task not in CLASSIFICATION_TASKS:
        known = ", ".join([*TASKS, *CLASSIFICATION_TASKS])
        raise ConfigError(f"{source}: task {task!r} is not a task tunelab knows ({known})")
    if "base_model" in config:
        out["model"] = config.pop("base_model")
    for key in ("project_name", "log"):
        if key in config:
            out[key] = config.pop(key)
    backend = config.pop("backend", None)
    if backend not in LOCAL_BACKENDS:
        print(f"tunelab: backend {backend!r} is AutoTrain's remote runner; tunelab trains on this machine.")

    data = section(config, "data", source, "path, train_split, valid_split, column_mapping")
    if "path" in data:
        out["data_path"] = data.pop("path")
    for key in ("train_split", "valid_split", "chat_template"):
        if key in data:
            out[key] = data.pop(key)
    mapping = section(data, "column_mapping", f"{source}: data", "text_column, ...")
    columns = [name for name in field_names(schema) if name.endswith("_column")]
    for key, value in mapping.items():
        if key not in columns:
            raise ConfigError(
                f"{source}: data.column_mapping.{key} is not a column of task {task!r} (use {', '.join(columns)})"
            )
        out[key] = value
    if data:
        raise ConfigError(f"{source}: unknown key data.{next(iter(data))}")

    hub = section(config, "hub", source, "username, token, push_to_hub")
    for key, value in hub.items():
        if key not in ("username", "token", "push_to_hub", "repo_id"):
            raise ConfigError(f"{source}: unknown key hub.{key}")
        out[key] = value

    params = section(config, "params", source, "parameter names and their values")
    out.update(normalize_keys(params, f"{source}: params", schema))
    if config:
        check_known(config, source, schema)  # names the stray top-level key, with a suggestion
        out.update(normalize_keys(config, source, schema))
    if task in VLM_TASKS:
        out.update(vlm_params(out.get("trainer") if out.get("trainer") != "sft" else None, VLM_TASKS[task], out))
    return {key: expand_env(value) for key, value in out.items()}


def vlm_params(trainer: str | None, default: str, given: dict[str, Any]) -> dict[str, Any]:
    """AutoTrain's vlm trainer (vqa or captioning) as tunelab's: sft, with that trainer's column defaults where the
    columns are not given."""
    kind = trainer or default
    if kind not in VLM_TRAINERS:
        raise ConfigError(f"vlm: trainer {kind!r} is not one of AutoTrain's vlm trainers ({', '.join(VLM_TRAINERS)})")
    return {"trainer": "sft", **{key: value for key, value in VLM_TRAINERS[kind].items() if given.get(key) is None}}


def is_autotrain_config(config: dict[str, Any]) -> bool:
    """AutoTrain YAMLs carry a task, a base_model or nested params/data sections."""
    return any(key in config for key in ("task", "base_model", "params", "hub")) or isinstance(
        config.get("data"), dict
    )


def section(config: dict[str, Any], name: str, source: str, holds: str) -> dict[str, Any]:
    """config[name] taken out as a mapping (empty when absent); anything else is an error naming the section."""
    value = config.pop(name, None)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {name} must be a mapping ({holds}), got {type(value).__name__} {value!r}"[:300])
    return dict(value)
