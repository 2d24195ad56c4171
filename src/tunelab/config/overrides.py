"""Merging parameter sources (YAML, CLI flags, Python keywords) and rejecting unknown names with a suggestion."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from tunelab.config.schema import LLMParams, field_names
from tunelab.errors import ConfigError


def check_known(values: dict[str, Any], where: str = "", schema: type = LLMParams) -> None:
    """Raise ConfigError for the first key that is not a field of `schema`, suggesting the nearest name."""
    from tunelab.config.autotrain import ALIASES  # autotrain imports this module

    names = field_names(schema)
    for key in values:
        if key not in names:
            near = difflib.get_close_matches(key, [*names, *ALIASES], n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            prefix = f"{where}: " if where else ""
            raise ConfigError(f"{prefix}unknown parameter {key!r}{hint}")


def coerce(values: dict[str, Any], schema: type = LLMParams) -> dict[str, Any]:
    """Convert YAML/CLI strings to each field's type ("3e-5" -> 3e-5, "true" -> True, "null" -> None)."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    out = {}
    for key, value in values.items():
        kind = str(fields[key].type)
        if isinstance(value, str):
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
        elif isinstance(value, bool) and not kind.startswith("bool"):
            raise ConfigError(f"{key}: expected {kind}, got {value!r}")
        elif isinstance(value, int) and kind.startswith("float"):
            value = float(value)
        elif isinstance(value, float) and kind.startswith("int") and value.is_integer():
            value = int(value)
        out[key] = value
    return out


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
    try:
        return schema(**coerce(merged, schema))
    except TypeError as err:  # a value of the wrong type that slipped past coerce
        raise ConfigError(str(err)) from None
