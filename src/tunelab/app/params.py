"""The parameters form: generated from the task's schema (LLMParams or TextClassificationParams: types, defaults,
help texts and choices), validated by `tunelab.config.load_config` - the code the CLI uses - with each ConfigError
shown on the field it names. An LLM project's form has the common fields plus its method's own (the registry's
`Entry.settings`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.app.uploads import FieldError, checked_model, resolve_user_path
from tunelab.config.llm import LLMParams
from tunelab.config.text_classification import TextClassificationParams
from tunelab.errors import ConfigError
from tunelab.hub import is_hub_id
from tunelab.rewards import BUILTINS, reward_names

CLASSIFIER = "text_classification"  # the new-project form's "trainer" for a text-classification project

# The fields the parameters page shows, in page order; every other parameter keeps its schema default.
LLM_FIELDS = (
    "peft", "freeze_trainable_layers", "lr", "epochs", "max_steps", "batch_size", "gradient_accumulation",
    "block_size", "model_max_length", "rope_scaling", "rope_scaling_factor", "warmup_ratio", "scheduler", "lora_r",
    "lora_alpha", "lora_dropout", "use_dora", "use_rslora", "init_lora_weights", "loraplus_lr_ratio", "packing",
    "mixed_precision", "gradient_checkpointing", "logging_steps",
    "valid_size", "early_stopping_patience", "seed", "chat_template_kwargs", "add_tokens", "add_special_tokens",
)  # fmt: skip
PAIR_FIELDS = ("max_prompt_length",)  # every method whose rows have a prompt apart (pairs, labeled, prompts)
CLASSIFIER_FIELDS = (
    "peft", "freeze_trainable_layers", "lr", "epochs", "max_steps", "batch_size", "gradient_accumulation",
    "max_seq_length", "warmup_ratio", "scheduler", "weight_decay", "lora_r", "lora_alpha", "lora_dropout",
    "mixed_precision", "valid_size", "eval_strategy", "early_stopping_patience", "logging_steps", "seed",
)  # fmt: skip
HUB_FIELDS = ("push_to_hub", "username", "repo_id")
# Where the app starts differs from the schema in one respect for LLMs: LoRA, at the learning rate LoRA wants (the
# schema's 3e-5 is a full fine-tuning rate). The README's quick start uses the same pair. Classifiers keep theirs.
APP_DEFAULTS: dict[str, Any] = {"peft": True, "lr": 2e-4}
# Set on the project pages, not here; a ConfigError naming them is shown on those pages.
PROJECT_FIELDS = ("trainer", "model", "data_path", "valid_split", "text_column", "prompt_text_column")
PROJECT_FIELDS += ("rejected_text_column", "chat_template", "target_column")
# Never a parameter from the form or the API: the paths there were checked against the allowed folders, and the
# run folder is the app's own.
FIXED_BY_PROJECT = (*PROJECT_FIELDS, "project_name", "task", "train_split")
# Parameters that name a file or folder of this machine: like the project's data and model, each path must lie
# inside the allowed folders (docs/app.md, Security model), and is passed on resolved. reward_functions' and tools'
# file.py:function is imported - run - by the dry run (in the app's own process) and by the training, and a reward
# model's folder loaded; model_ref and teacher_model are loaded; the JSON schema and the accelerate config are read.
PATH_FIELDS = ("model_ref", "teacher_model", "reward_functions", "tools", "reward_json_schema", "accelerate_config")
# A folder the run writes to and prunes: not from the app, whose runs keep the default data cache.
REFUSED_FIELDS = ("cache_dir",)


def is_classifier(settings: dict[str, Any]) -> bool:
    """A text-classification project's settings, or such a job's parameters (both say so in "trainer")."""
    return settings.get("trainer") == CLASSIFIER


def schema_of(trainer: str | None) -> type:
    return TextClassificationParams if trainer == CLASSIFIER else LLMParams


def form_fields(trainer: str | None) -> tuple[str, ...]:
    """The parameters the form shows for a project's trainer (a method's own after the common ones)."""
    from tunelab.methods import REGISTRY

    if trainer == CLASSIFIER:
        return CLASSIFIER_FIELDS + HUB_FIELDS
    entry = REGISTRY.get(trainer or "sft")
    own = () if entry is None else (PAIR_FIELDS if entry.data != "examples" else ()) + entry.settings
    return LLM_FIELDS + own + HUB_FIELDS


def all_form_fields() -> tuple[str, ...]:
    """Every field any form shows (to name the field a message is about)."""
    from tunelab.methods import REGISTRY

    names = dict.fromkeys(form_fields(CLASSIFIER))
    for trainer in REGISTRY:
        names.update(dict.fromkeys(form_fields(trainer)))
    return tuple(names)


@dataclass
class FieldSpec:
    """One input of the form, as the template draws it."""

    name: str
    kind: str  # bool, int, float, str (a dict-typed one, chat_template_kwargs, is typed as JSON text), choice
    default: Any
    help: str
    choices: tuple = ()
    optional: bool = False
    method: str | None = None  # the method whose own setting it is (shown under that method's heading)


def field_specs(trainer: str | None = "sft") -> list[FieldSpec]:
    """The form inputs of a project's trainer, taken from its schema's fields."""
    from tunelab.methods import REGISTRY

    schema = schema_of(trainer)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    entry = REGISTRY.get(trainer or "sft") if schema is LLMParams else None
    own = set(entry.settings) if entry is not None else set()
    specs = []
    for name in form_fields(trainer):
        f = fields[name]
        kind = str(f.type)
        choices = tuple(f.metadata.get("choices") or ())
        default = APP_DEFAULTS.get(name, f.default) if schema is LLMParams else f.default
        if choices:
            shown = "choice"
        elif kind.startswith("bool"):
            shown = "bool"
        elif kind.startswith(("int", "float")):
            shown = kind.split()[0]
        else:
            shown = "str"
        method = (trainer or "sft") if name in own else None
        specs.append(FieldSpec(name, shown, default, f.metadata["help"], choices, "None" in kind, method))
    return specs


def carried_params(params: dict[str, Any], trainer: str | None) -> dict[str, Any]:
    """The parameters of a job that "run again" carries beyond the form: those a job was given through the API or a
    config (target_modules, lora_rank_pattern...) with a value other than the schema's default. The form's own
    fields, the project's and the token are not among them (they are filled, fixed, or typed again)."""
    schema = {f.name: f.default for f in dataclasses.fields(schema_of(trainer))}
    kept = {*form_fields(trainer), *FIXED_BY_PROJECT, *REFUSED_FIELDS, "token"}
    return {k: v for k, v in params.items() if k in schema and k not in kept and v != schema[k]}


def read_carried(text: str | None, trainer: str | None) -> dict[str, Any]:
    """The carried parameters a params form sends back (JSON in its hidden field): only names carried_params could
    have written (anything else is dropped, not trusted); FieldError("form") for text that is not a JSON object."""
    if not text:
        return {}
    try:
        values = json.loads(text)
    except ValueError:
        values = None
    if not isinstance(values, dict):
        raise FieldError("form", "the carried parameters are not a JSON object: open the page again")
    return carried_params(values, trainer)


def form_values(form: dict[str, str], trainer: str | None = "sft") -> dict[str, Any]:
    """The parameter values a submitted form holds (unchecked boxes are false; empty optional fields none)."""
    values: dict[str, Any] = {}
    for spec in field_specs(trainer):
        raw = form.get(spec.name)
        if spec.kind == "bool":
            values[spec.name] = raw is not None and raw.lower() in ("on", "true", "1", "yes")
        elif raw is None:
            continue
        elif raw.strip() == "" or (spec.kind == "choice" and raw == "none"):
            values[spec.name] = None if spec.optional else ""
        else:
            values[spec.name] = raw.strip()
    return values


def default_values(trainer: str | None = "sft") -> dict[str, Any]:
    return {spec.name: spec.default for spec in field_specs(trainer)}


def build_params(settings: dict[str, Any], values: dict[str, Any], roots: list[Path]) -> tuple[Any, dict[str, str]]:
    """(LLMParams or TextClassificationParams, {}) from a project's settings and the form's values, or
    (None, {field: message}).

    The paths among the values must lie inside `roots` (the app's allowed folders). The whole set is checked first
    (errors between fields, named by load_config); when it fails, each form field is also checked alone against the
    project, so every field that is wrong on its own gets its message at once.
    """
    from tunelab.config import load_config

    errors: dict[str, str] = {}
    clean: dict[str, Any] = {}
    for name, value in values.items():
        if value == "":
            errors[name] = "a value is required"
        elif name in FIXED_BY_PROJECT:  # data, model and run folder are the project's (checked against the roots)
            errors[name] = f"{name} is set by the project, not by its parameters"
        elif name in REFUSED_FIELDS:
            errors[name] = f"{name} is not set from the app (its runs keep the default data cache)"
        elif name in PATH_FIELDS and value is not None:
            try:
                clean[name] = checked_path_value(name, value, roots)
            except FieldError as err:
                errors[name] = err.message
        else:
            clean[name] = value
    try:
        params = load_config({**project_params(settings), **clean})
    except ConfigError as err:
        for name, value in clean.items():
            try:
                load_config({**project_params(settings), name: value})
            except ConfigError as alone:
                # "push_to_hub needs repo_id" when repo_id is filled in: a complaint about the company the field
                # keeps, which the whole set (checked above) answers; only the field's own faults are kept.
                others = [word for word in re.findall(r"[a-z_]+", str(alone)) if word in clean and word != name]
                if not others:
                    errors[name] = str(alone)
        if not errors:
            errors[field_named(str(err), [*clean, *PROJECT_FIELDS])] = str(err)
        return None, errors
    return (None, errors) if errors else (params, {})


def checked_path_value(name: str, value: Any, roots: list[Path]) -> str:
    """A PATH_FIELDS value with its paths resolved inside `roots` (a hub id or a built-in reward stays as typed);
    FieldError names the field when a path leaves them."""
    if not isinstance(value, str):
        raise FieldError(name, "expected a path (text)")
    if name in ("model_ref", "teacher_model"):
        return checked_model(name, value.strip(), roots)
    if name == "reward_functions":  # built-ins, file.py:function and reward models' folders (rewards.py)
        checked = []
        for spec in reward_names(value):
            file, colon, function = spec.rpartition(":")
            if colon:
                checked.append(f"{resolve_user_path(name, file, roots)}:{function}")
            elif spec in BUILTINS:
                checked.append(spec)
            elif "/" not in spec and not (roots[0] / spec).exists():  # a mistyped built-in, most likely
                known = f"not a built-in ({', '.join(BUILTINS)}), a file.py:function, nor a reward model's folder"
                raise FieldError(name, f"{spec}: {known}")
            elif is_hub_id(spec) and not (roots[0] / spec).exists():  # a reward model on the hub, as typed
                checked.append(spec)
            else:  # a reward model's folder
                checked.append(str(resolve_user_path(name, spec, roots)))
        return ",".join(checked)
    if name == "tools":  # file.py:function, each file inside the allowed folders (it is imported: run)
        tools = []
        for spec in reward_names(value):
            file, colon, function = spec.rpartition(":")
            if not colon or not file:
                raise FieldError(name, f"{spec}: expected file.py:function")
            tools.append(f"{resolve_user_path(name, file, roots)}:{function}")
        return ",".join(tools)
    return str(resolve_user_path(name, value.strip(), roots))


def project_params(settings: dict[str, Any]) -> dict[str, Any]:
    """The parameters a project's settings decide (task, model, data, mapping), in load_config's names."""
    if is_classifier(settings):
        keys: tuple[str, ...] = ("model", "data_path", "text_column", "target_column", "project_name")
        values = {"task": CLASSIFIER, **{k: settings[k] for k in keys if settings.get(k) not in (None, "")}}
    else:
        keys = ("trainer", "model", "data_path", "text_column", "prompt_text_column", "rejected_text_column")
        keys += ("chat_template", "project_name")
        values = {k: settings[k] for k in keys if settings.get(k) not in (None, "")}
    return {**values, "valid_split": settings.get("valid_split") or None}


def field_named(message: str, names: list[str]) -> str:
    """The field a ConfigError message is about: the first parameter name it mentions ('form' when none)."""
    for word in re.findall(r"[a-z_]+", message):
        if word in names:
            return word
    return "form"
