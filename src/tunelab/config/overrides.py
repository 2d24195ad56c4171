"""Merging parameter sources (YAML, CLI flags, Python keywords) into one parameter object: AutoTrain's spellings
applied, unknown names rejected with a suggestion, strings coerced to each field's type, and `${NAME}` values
whose variable is unset named as such.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from tunelab.config.aliases import ALIASES, CLASSIFICATION_TASKS
from tunelab.config.base import Params, field_names
from tunelab.config.llm import LLMParams
from tunelab.config.text_classification import TextClassificationParams
from tunelab.errors import ConfigError
from tunelab.user_code import function_specs


def params_class(task: str | None) -> type[Params]:
    """The parameter class a config's `task` describes (AutoTrain's task names; no task: an LLM run)."""
    return TextClassificationParams if task in CLASSIFICATION_TASKS else LLMParams


class Unset:
    """A `${NAME}` whose environment variable is not set (config/autotrain.expand_env)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"${{{self.name}}}"


def check_known(values: dict[str, Any], where: str = "", schema: type = LLMParams) -> None:
    """Raise ConfigError for the first key that is not a field of `schema`, suggesting the nearest name."""
    names = field_names(schema)
    for key in values:
        if key not in names:
            near = difflib.get_close_matches(key, [*names, *ALIASES], n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            prefix = f"{where}: " if where else ""
            raise ConfigError(f"{prefix}unknown parameter {key!r}{hint}")


def normalize_keys(values: dict[str, Any], where: str, schema: type | None = None) -> dict[str, Any]:
    """Apply ALIASES and dash->underscore to a dict of parameters; unknown names raise with a suggestion."""
    schema = schema or LLMParams
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


def coerce(values: dict[str, Any], schema: type = LLMParams) -> dict[str, Any]:
    """Convert YAML/CLI strings to each field's type ("3e-5" -> 3e-5, "true" -> True, "null" -> None)."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    out = {}
    for key, value in values.items():
        kind = str(fields[key].type)
        if fields[key].metadata.get("functions"):  # functions handed to the Python API, as the specs they run under
            value = function_specs(value, fields[key].metadata["functions"], key)
        if key == "data_path" and isinstance(value, (list, tuple)):
            out[key] = list(value)  # a mixture of sources (data/mixture.py checks each when the data is read)
            continue
        if value is None:  # YAML's null (`train_split:` with nothing after it): only where unset means something
            if "None" not in kind:
                raise ConfigError(f"{key}: a value is required")
        elif isinstance(value, str):
            text = value.strip()
            # "none" is a real value where it is one of the choices (chat_template: none != unset).
            literal_none = "none" in (fields[key].metadata.get("choices") or ())
            if text.lower() in ("null", "~") or (text.lower() == "none" and not literal_none):
                if "None" not in kind:
                    raise ConfigError(f"{key}: a value is required")
                value = None
            elif kind.startswith("bool"):
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ConfigError(f"{key}: expected true or false, got {value!r}")
                value = text.lower() in ("true", "1", "yes")
            elif kind.startswith("int"):
                value = _number(key, text, int)
            elif kind.startswith("float"):
                value = _number(key, text, float)
        elif (
            isinstance(value, (list, tuple))
            and kind.startswith("str")
            and value
            and all(isinstance(item, (str, int, float)) and not isinstance(item, bool) for item in value)
        ):
            value = ",".join(str(item) for item in value)  # YAML's [a, b] for a comma-separated field
        elif isinstance(value, dict) and kind.startswith("dict"):
            value = dict(value)  # an object parameter (chat_template_kwargs), checked by its class
        elif isinstance(value, (list, tuple)) and kind.startswith("list"):
            value = list(value)  # a list parameter (add_tokens: items may hold commas), checked by its class
        elif isinstance(value, (list, dict, tuple, set, bytes)):
            raise ConfigError(f"{key}: expected one value, got {type(value).__name__} {_short(value)}")
        elif isinstance(value, bool) and kind.startswith("str"):
            # YAML 1.1 reads yes/no/on/off as booleans: `padding: no` arrives as False.
            raise ConfigError(f"{key}: expected text, got {value!r} (YAML reads yes/no/on/off as booleans: quote it)")
        elif isinstance(value, bool) and not kind.startswith("bool"):
            raise ConfigError(f"{key}: expected {kind}, got {value!r}")
        elif isinstance(value, (int, float)) and kind.startswith("str"):
            value = str(value)  # `project_name: 2024`, `username: 42`
        elif isinstance(value, int) and kind.startswith("float"):
            value = float(value)
        elif isinstance(value, float) and kind.startswith("int"):
            if not value.is_integer():
                raise ConfigError(f"{key}: expected a whole number, got {value!r}")
            value = int(value)
        out[key] = value
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(key: str, text: str, kind: type) -> int | float:
    try:
        number = float(text)
    except ValueError:
        raise ConfigError(f"{key}: expected a number, got {text!r}") from None
    if kind is int:
        if not number.is_integer():
            raise ConfigError(f"{key}: expected a whole number, got {text!r}")
        return int(number)
    return number


def build_params(*sources: dict[str, Any], schema: type = LLMParams) -> Any:
    """A parameter object (LLMParams unless `schema` says otherwise) from dicts, later ones overriding."""
    merged: dict[str, Any] = {}
    for source in sources:
        check_known(source, schema=schema)
        merged.update(source)
    unset = _take_unset(merged, schema)
    try:
        return schema(**coerce(merged, schema))
    except TypeError as err:  # a value of the wrong type that slipped past coerce
        raise ConfigError(str(err)) from None
    except ConfigError as err:  # e.g. push_to_hub without username: say that its variable is what is missing
        if not unset:
            raise
        named = ", ".join(f"{key} is ${{{name}}}" for key, name in unset.items())
        raise ConfigError(f"{err} ({named}, which is not set in the environment)") from None


def _take_unset(values: dict[str, Any], schema: type) -> dict[str, str]:
    """Replace `${NAME}` values whose variable is unset by None, where the parameter may be unset; return
    {parameter: variable} for them. Where a value is required, the unset variable is the error."""
    kinds = {f.name: str(f.type) for f in dataclasses.fields(schema)}
    unset = {}
    for key, value in values.items():
        if isinstance(value, Unset):
            if "None" not in kinds[key]:
                raise ConfigError(
                    f"{key}: ${{{value.name}}} is not set in the environment (export {value.name}=..., or write "
                    f"the value in the config)"
                )
            values[key] = None
            unset[key] = value.name
    return unset
