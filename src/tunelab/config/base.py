"""What every task's parameters share: how a field is declared, the common checks, and `RunParams`, the type
shared code takes.

Each task has its own parameter class (config/llm.py, config/text_classification.py), a dataclass whose fields
carry their help text and allowed values (`param`), so the CLI flags, the AutoTrain translator and docs/config.md
are derived from it. Code that serves both tasks (the trainer, checkpoints, outputs, memory, the launcher) is typed
with `RunParams`, the Protocol of what both classes have.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import field
from pathlib import Path
from typing import Any, Protocol

from tunelab.errors import ConfigError

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# The launch fields every task shares: (default, help[, choices]).
LAUNCH: dict[str, tuple] = {
    "distributed_backend": (
        None,
        "How several processes share the work: ddp (a model copy per GPU), fsdp (weights, gradients and optimizer "
        "sharded, FSDP2), deepspeed (ZeRO-3 with CPU offload); none: ddp when num_processes > 1.",
        (None, "ddp", "fsdp", "deepspeed"),
    ),
    "num_processes": (1, "Processes (one per GPU) on each machine; more than 1 launches through accelerate."),
    "num_machines": (1, "Machines taking part (multi-node: run the same command on each, with its machine_rank)."),
    "machine_rank": (0, "This machine's rank among num_machines (0 on the head machine)."),
    "main_process_ip": (None, "Address of the head machine (machine_rank 0), for multi-node runs."),
    "main_process_port": (29500, "Port of the head machine, for multi-node runs."),
    "accelerate_config": (
        None,
        "An accelerate config file to launch with instead of the one tunelab ships for distributed_backend.",
    ),
}
# The LoRA variants every task offers, each passed to PEFT's LoraConfig (models/peft.py): (default, help[, choices]).
LORA_VARIANTS: dict[str, tuple] = {
    "use_dora": (
        False,
        "LoRA: DoRA (weight-decomposed LoRA: a trained magnitude per output feature beside the low-rank update).",
    ),
    "use_rslora": (False, "LoRA: rank-stabilized scaling, alpha / sqrt(r) instead of alpha / r."),
    "init_lora_weights": (
        "default",
        "LoRA: how the adapter starts: default (zero update), gaussian, pissa (principal singular vectors of each "
        "weight, the rest left in the base), olora (QR of each weight); loftq is refused (see docs/lora.md).",
        ("default", "gaussian", "pissa", "olora", "loftq"),
    ),
    "loraplus_lr_ratio": (
        None,
        "LoRA+: the B matrices learn at lr x this ratio, the A matrices at lr (the LoRA+ paper suggests 16).",
    ),
    "lora_rank_pattern": (
        None,
        "LoRA: other ranks for some modules, comma-separated name=rank (a name or regex, as PEFT's rank_pattern): "
        "q_proj=32,v_proj=8.",
    ),
    "lora_alpha_pattern": (None, "LoRA: other alphas for some modules, comma-separated name=alpha."),
    "modules_to_save": (
        None,
        "LoRA: modules trained and saved whole beside the adapter, comma-separated (embed_tokens,lm_head: every "
        "token's rows; add_tokens trains only the added ones).",
    ),
}
# Freeze training, a full fine-tuning of some of the weights (models/freeze.py), for every task: (default, help).
FREEZE_SETTINGS: dict[str, tuple] = {
    "freeze_trainable_layers": (
        None,
        "Without peft: train only the last N decoder (or encoder) layers (negative: the first N), the rest frozen "
        "(LLaMA-Factory's finetuning_type freeze, whose default is 2; a classifier's new head always trains). "
        "Unset: every weight trains.",
    ),
    "freeze_trainable_modules": (
        "all",
        "freeze_trainable_layers: the modules of those layers that train, comma-separated names inside a layer "
        "(mlp, self_attn, mlp.down_proj), or all.",
    ),
    "freeze_extra_modules": (
        None,
        "With freeze_trainable_layers or unfrozen_parameters: modules outside the layers that train too, "
        "comma-separated (embed_tokens, norm, lm_head; a BERT's pooler).",
    ),
    "unfrozen_parameters": (
        None,
        "Without peft: train only the parameters whose names match one of these regular expressions, from the "
        "name's start (Axolotl's; a YAML list, or on the command line separated by spaces), the rest frozen; with "
        "freeze_trainable_layers, these too. E.g. ['^lm_head.weight$', 'model.layers.1[0-9].mlp.*'].",
    ),
}
SAVE_STEPS_HELP = "Write a checkpoint (to resume from) every N optimizer steps; -1: twice per run, at most every 500."
RESUME_HELP = (
    "Continue an interrupted run of the same project_name from its last complete checkpoint (same data order, "
    "optimizer, scheduler and random state); false: discard it and start over."
)


def param(
    default: Any,
    help: str,
    choices: tuple | None = None,
    secret: bool = False,
    open_choices: bool = False,
    functions: str | None = None,
) -> Any:
    """A dataclass field whose help text (and allowed values) travel with it to the CLI and the docs.
    `open_choices`: the choices are named values beside values of another kind (chat_template: a name, or a
    template file), which the parameter class checks itself. `functions` ("reward", "tool"): the Python API may
    also hand it function objects (a list of them, names among them), held as specs (user_code.function_spec)."""
    meta: dict[str, Any] = {"help": help, "secret": secret, "functions": functions}
    if choices is not None:
        meta["choices"] = choices
        meta["open_choices"] = open_choices
    return field(default=default, metadata=meta, repr=not secret)


class Params:
    """What every parameter object shares: a redacted dict/JSON view (the token never leaves as itself)."""

    def to_dict(self, redact: bool = True) -> dict[str, Any]:
        """All parameters as plain values; secrets replaced by '***' unless redact is False."""
        values = dataclasses.asdict(self)
        if redact:
            for f in dataclasses.fields(self):
                if f.metadata.get("secret") and values.get(f.name):
                    values[f.name] = "***"
        return values

    def to_json(self) -> str:
        """The redacted parameters as JSON (what lands in training_params.json)."""
        return json.dumps(self.to_dict(redact=True), indent=2, sort_keys=True)


class RunParams(Protocol):
    """The parameters every task has: LLMParams and TextClassificationParams both satisfy it.

    `task` and the switches a task does not offer (a classifier has no packing or fused ops) are class constants of
    the task's class, so shared code reads `params.packing` without asking which task it serves.
    """

    task: str  # the spine in tunelab/tasks/ that runs these parameters
    trainer: str  # the training method (LLM) or the task's own name
    model: str
    project_name: str
    data_path: str
    train_split: str
    valid_split: str | None
    valid_size: float | None
    text_column: str
    bad_rows: str
    lr: float
    epochs: int
    max_steps: int
    batch_size: int
    gradient_accumulation: int
    auto_find_batch_size: bool
    warmup_ratio: float
    optimizer: str
    scheduler: str
    weight_decay: float
    max_grad_norm: float
    seed: int
    mixed_precision: str | None
    disable_gradient_checkpointing: bool
    checkpoint_every: int
    fast_loss: bool
    fused_ops: bool
    torch_compile: bool
    packing: bool
    use_flash_attention_2: bool
    peft: bool
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    use_dora: bool
    use_rslora: bool
    init_lora_weights: str
    loraplus_lr_ratio: float | None
    lora_rank_pattern: str | None
    lora_alpha_pattern: str | None
    modules_to_save: str | None
    target_modules: str | None
    quantization: str | None
    freeze_trainable_layers: int | None
    freeze_trainable_modules: str
    freeze_extra_modules: str | None
    unfrozen_parameters: list[str] | None
    log: str
    logging_steps: int
    eval_strategy: str
    save_total_limit: int
    save_steps: int
    resume: bool
    push_to_hub: bool
    username: str | None
    repo_id: str | None
    token: str | None
    distributed_backend: str | None
    num_processes: int
    num_machines: int
    machine_rank: int
    main_process_ip: str | None
    main_process_port: int
    accelerate_config: str | None

    def to_dict(self, redact: bool = True) -> dict[str, Any]: ...


BAD_ROWS_HELP = (
    "Rows that cannot be used (missing, empty or wrong-typed fields, bad messages): `error` lists them with "
    "file, line and column and stops before training; `skip` drops them and logs how many and which."
)


def check_choices(params: RunParams) -> None:
    """Every field with a list of allowed values holds one of them ("no" mixed precision means none); fields
    with open choices are checked by their parameter class."""
    if params.mixed_precision == "no":
        params.mixed_precision = None
    for f in dataclasses.fields(params):
        choices = f.metadata.get("choices") if not f.metadata.get("open_choices") else None
        value = getattr(params, f.name)
        if choices is not None and value not in choices:
            shown = ", ".join("none" if c is None else str(c) for c in choices)
            raise ConfigError(f"{f.name}: {value!r} is not one of {shown}")


def check_training(params: RunParams) -> None:
    """The checks every task's parameters share: schedule, steps, LoRA, quantization, hub."""
    if not 0 <= params.warmup_ratio < 1:
        raise ConfigError(f"warmup_ratio must be in [0, 1), got {params.warmup_ratio}")
    if not 0 <= params.lora_dropout < 1:
        raise ConfigError(f"lora_dropout must be in [0, 1), got {params.lora_dropout}")
    if params.max_steps == 0 or params.max_steps < -1:
        raise ConfigError(f"max_steps must be a positive number of steps or -1, got {params.max_steps}")
    if params.quantization is not None and not params.peft:
        raise ConfigError(f"quantization={params.quantization} trains a LoRA adapter on a quantized model: add --peft")
    check_lora_variants(params)
    if params.push_to_hub and not (params.repo_id or params.username):
        raise ConfigError("push_to_hub needs username (or repo_id) to know where to push")
    if params.push_to_hub and not (params.token or os.environ.get("HF_TOKEN")):
        # Found now, not when the run has finished training and the upload would fail.
        raise ConfigError("push_to_hub needs a token: set --token, hub.token in the config, or HF_TOKEN")


def check_valid_size(params: RunParams) -> None:
    """valid_size is a share of the train split (0 < x < 1) or a whole number of its examples, and the only
    source of the validation split: not beside valid_split, nor with streaming (the examples are not counted)."""
    size = params.valid_size
    if size is None:
        return
    if not (size > 0 and math.isfinite(size)) or (size >= 1 and size != int(size)):
        raise ConfigError(
            f"valid_size must be a share of the train split between 0 and 1, or a whole number of its examples; "
            f"got {size}"
        )
    if params.valid_split:
        raise ConfigError(
            f"valid_size holds validation examples out of the train split, and valid_split ({params.valid_split!r}) "
            "names a split of its own: give one of them"
        )
    if getattr(params, "streaming", False):
        raise ConfigError(
            "valid_size draws from the train split's examples, which a streamed run does not have before training: "
            "give a valid_split instead, or leave streaming off"
        )


def check_freezing(params: RunParams) -> None:
    """freeze_* and unfrozen_parameters (FREEZE_SETTINGS): whole numbers and regular expressions, each setting with
    what it refines, never with peft. Their names are checked against the model by models/checks.py."""
    patterns = params.unfrozen_parameters
    if isinstance(patterns, str):
        patterns = patterns.split()
    if patterns is not None and (
        not isinstance(patterns, (list, tuple)) or not patterns or not all(isinstance(p, str) for p in patterns)
    ):
        raise ConfigError(f"unfrozen_parameters must be regular expressions (a list of texts), got {patterns!r}")
    for pattern in patterns or ():
        try:
            re.compile(pattern)
        except re.error as error:
            raise ConfigError(f"unfrozen_parameters: {pattern!r} is not a regular expression ({error})") from None
    params.unfrozen_parameters = list(patterns) if patterns else None
    layers = params.freeze_trainable_layers
    if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int) or layers == 0):
        raise ConfigError(f"freeze_trainable_layers must be a whole number other than 0, got {layers!r}")
    freezing = layers is not None or params.unfrozen_parameters is not None
    if params.freeze_extra_modules and not freezing:
        raise ConfigError(
            "freeze_extra_modules is read with freeze_trainable_layers or unfrozen_parameters: give one of them"
        )
    if str(params.freeze_trainable_modules).strip() not in ("all", "") and layers is None:
        raise ConfigError("freeze_trainable_modules is read with freeze_trainable_layers: give it too")
    if freezing and params.peft:
        setting = "freeze_trainable_layers" if layers is not None else "unfrozen_parameters"
        raise ConfigError(
            f"{setting} trains some of the weights themselves (full fine-tuning of part of the model), peft a "
            "LoRA adapter: keep one (target_modules chooses where LoRA goes)"
        )


def check_lora_variants(params: RunParams) -> None:
    """The LoRA variants ask for peft, and their values must be PEFT's."""
    chosen = [name for name, (default, *_) in LORA_VARIANTS.items() if getattr(params, name) not in (default, None)]
    if chosen and not params.peft:
        raise ConfigError(f"{chosen[0]} is a LoRA setting: add --peft (or drop it)")
    if params.loraplus_lr_ratio is not None and params.loraplus_lr_ratio < 1:
        raise ConfigError(
            f"loraplus_lr_ratio must be 1 or more (B learns faster than A), got {params.loraplus_lr_ratio}"
        )
    if isinstance(params.modules_to_save, (list, tuple)):  # a YAML list
        params.modules_to_save = ",".join(str(name) for name in params.modules_to_save)
    for name in ("lora_rank_pattern", "lora_alpha_pattern"):
        module_values(params, name)  # raises on a malformed pattern
    if params.init_lora_weights == "loftq":
        raise ConfigError(
            "init_lora_weights=loftq is not offered: PEFT's LoftQ quantizes every weight with bitsandbytes on a CUDA "
            "GPU and changes the base it adapts, which must then be saved and loaded quantized the same way; use "
            "pissa, olora, gaussian or the default"
        )
    sharded = params.distributed_backend in ("fsdp", "deepspeed")
    if params.init_lora_weights in ("pissa", "olora") and sharded:
        raise ConfigError(
            f"init_lora_weights={params.init_lora_weights} with {params.distributed_backend}: the adapter is saved "
            "converted against its starting copy, which needs whole (unsharded) weights; use ddp, or the default init"
        )
    patterns = params.lora_rank_pattern or params.lora_alpha_pattern
    if params.init_lora_weights in ("pissa", "olora") and params.use_rslora and patterns:
        raise ConfigError(
            f"init_lora_weights={params.init_lora_weights} with use_rslora and rank/alpha patterns: PEFT cannot "
            "convert such an adapter back to plain LoRA of the base; drop one of them"
        )
    if params.use_dora and params.init_lora_weights in ("pissa", "olora"):
        raise ConfigError(
            f"use_dora with init_lora_weights={params.init_lora_weights}: PEFT initialises DoRA its own way"
        )


def listed_tokens(params: RunParams) -> list[str]:
    """The tokens a run adds (an LLM run's add_tokens, then add_special_tokens); none for a task without them."""
    return [*(getattr(params, "add_tokens", None) or []), *(getattr(params, "add_special_tokens", None) or [])]


def module_values(params: RunParams, name: str) -> dict[str, int]:
    """A `name=value,...` pattern (or a YAML mapping) as {module: value}."""
    spec = getattr(params, name)
    if not spec:
        return {}
    if isinstance(spec, dict):
        pairs = list(spec.items())
    else:
        pairs = [item.split("=", 1) if "=" in item else (item, "") for item in str(spec).split(",") if item.strip()]
    values = {}
    for module, value in pairs:
        try:
            number = int(str(value).strip())
        except ValueError:
            raise ConfigError(f"{name}: {str(module).strip()}={value!r} is not a module=number pair") from None
        if number <= 0:
            raise ConfigError(f"{name}: {str(module).strip()} must be given a positive number, got {number}")
        values[str(module).strip()] = number
    return values


def check_launch(params: RunParams) -> None:
    """Launch settings that cannot work, found before anything starts."""
    check_positive(params, "num_processes", "num_machines", "main_process_port")
    if not 0 <= params.machine_rank < params.num_machines:
        raise ConfigError(f"machine_rank must be in [0, num_machines), got {params.machine_rank}")
    if params.num_machines > 1 and not params.main_process_ip:
        raise ConfigError("a multi-node run (num_machines > 1) needs main_process_ip: the head machine's address")
    if params.accelerate_config and not Path(params.accelerate_config).expanduser().is_file():
        raise ConfigError(f"accelerate_config: {params.accelerate_config} is not a file")


def check_save_steps(params: RunParams) -> None:
    if params.save_steps == 0 or params.save_steps < -1:
        raise ConfigError(f"save_steps must be a positive number of steps or -1, got {params.save_steps}")


def check_positive(params: RunParams, *names: str) -> None:
    for name in names:
        value = getattr(params, name)
        if value is None or value <= 0:
            raise ConfigError(f"{name} must be positive, got {value}")


def field_names(schema: type) -> list[str]:
    """The names of every parameter of a parameter class, in declaration order."""
    return [f.name for f in dataclasses.fields(schema)]
