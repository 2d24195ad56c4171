"""AutoTrain Advanced's spellings, translated onto tunelab's LLMParams. The only home of that knowledge.

Two dialects reach tunelab from AutoTrain users:
- config YAML: task / base_model / project_name / log / backend / data{...} / params{...} / hub{...};
- `autotrain llm` flags, old and new (`--use-peft`, `--use-int4`, `--fp16`, `--learning-rate`, ...).
Both become a plain dict of LLMParams field names, which `config.resolve` turns into the parameter object.
"""

from __future__ import annotations

import os
import re
from typing import Any

from tunelab.config.schema import field_names
from tunelab.errors import ConfigError

# AutoTrain task -> tunelab trainer (AutoTrain: `llm` and `llm-generic` train the plain causal-LM objective).
TASKS = {
    "llm": "default",
    "llm-generic": "default",
    "llm-default": "default",
    "llm-sft": "sft",
    "llm-reward": "reward",
    "llm-dpo": "dpo",
    "llm-orpo": "orpo",
}
# Tasks that are not LLM training methods: the parameter class each one is read into.
CLASSIFICATION_TASKS = ("text_classification", "text-classification")


def schema_of(config: dict[str, Any]) -> type:
    """The parameter class an AutoTrain config (or a flat dict with `task`) describes."""
    if config.get("task") in CLASSIFICATION_TASKS:
        from tunelab.config.text_classification import TextClassificationParams

        return TextClassificationParams
    from tunelab.config.schema import LLMParams

    return LLMParams


# AutoTrain `backend` values that mean "somewhere else": tunelab always trains on this machine and says so.
LOCAL_BACKENDS = ("local", "local-cli", "local-ui", None)

# Old and alternative flag / key spellings -> (field, value to set or None to take the given value).
ALIASES: dict[str, tuple[str, Any]] = {
    "use_peft": ("peft", True),
    "use_int4": ("quantization", "int4"),
    "use_int8": ("quantization", "int8"),
    "fp16": ("mixed_precision", "fp16"),
    "bf16": ("mixed_precision", "bf16"),
    "learning_rate": ("lr", None),
    "num_train_epochs": ("epochs", None),
    "train_batch_size": ("batch_size", None),
    "per_device_train_batch_size": ("batch_size", None),
    "gradient_accumulation_steps": ("gradient_accumulation", None),
    "warmup_steps_ratio": ("warmup_ratio", None),
    "lora_rank": ("lora_r", None),
    "model_name": ("model", None),
    "base_model": ("model", None),
    "data": ("data_path", None),
    "lr_scheduler_type": ("scheduler", None),
    "optim": ("optimizer", None),
    "evaluation_strategy": ("eval_strategy", None),
    "max_seq_length": ("block_size", None),
    "hub_token": ("token", None),
    "hub_model_id": ("repo_id", None),
}

_ENV = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")


def expand_env(value: Any) -> Any:
    """`${NAME}` -> the environment's NAME (None when unset), as AutoTrain's config loader does."""
    if isinstance(value, str):
        match = _ENV.match(value.strip())
        if match:
            return os.environ.get(match.group(1)) or None
    return value


def from_autotrain_config(config: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Flatten an AutoTrain-schema YAML (already parsed) into LLMParams keyword arguments.

    Raises ConfigError naming the key for anything it cannot map, so nothing a user wrote is silently ignored.
    """
    from tunelab.config.overrides import check_known

    config = dict(config)
    schema = schema_of(config)
    out: dict[str, Any] = {}
    task = config.pop("task", "llm")
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

    data = config.pop("data", None) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: data must be a mapping with path, train_split, ...")
    data = dict(data)
    if "path" in data:
        out["data_path"] = data.pop("path")
    for key in ("train_split", "valid_split", "chat_template"):
        if key in data:
            out[key] = data.pop(key)
    mapping = data.pop("column_mapping", None) or {}
    columns = [name for name in field_names(schema) if name.endswith("_column")]
    for key, value in mapping.items():
        if key not in columns:
            raise ConfigError(
                f"{source}: data.column_mapping.{key} is not a column of task {task!r} (use {', '.join(columns)})"
            )
        out[key] = value
    if data:
        raise ConfigError(f"{source}: unknown key data.{next(iter(data))}")

    hub = config.pop("hub", None) or {}
    for key, value in dict(hub).items():
        if key not in ("username", "token", "push_to_hub", "repo_id"):
            raise ConfigError(f"{source}: unknown key hub.{key}")
        out[key] = value

    params = config.pop("params", None) or {}
    out.update(normalize_keys(params, f"{source}: params", schema))
    if config:
        check_known(config, source, schema)  # names the stray top-level key, with a suggestion
        out.update(normalize_keys(config, source, schema))
    return {key: expand_env(value) for key, value in out.items()}


def normalize_keys(values: dict[str, Any], where: str, schema: type | None = None) -> dict[str, Any]:
    """Apply ALIASES and dash->underscore to a dict of parameters; unknown names raise with a suggestion."""
    from tunelab.config.overrides import check_known

    schema = schema or schema_of({})
    own = set(field_names(schema))
    out: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = raw_key.replace("-", "_")
        if key in ALIASES and key not in own:  # text classification's max_seq_length is its own parameter
            target, fixed = ALIASES[key]
            if fixed is not None:
                if value in (False, None, "false", "False"):
                    continue  # e.g. `use_int4: false` asks for nothing
                value = fixed
            key = target
        check_known({key: value}, where, schema)
        out[key] = value
    return out


def is_autotrain_config(config: dict[str, Any]) -> bool:
    """AutoTrain YAMLs carry a task, a base_model or nested params/data sections."""
    return any(key in config for key in ("task", "base_model", "params", "hub")) or isinstance(
        config.get("data"), dict
    )
