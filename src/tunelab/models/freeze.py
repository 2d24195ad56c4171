"""Freeze training: a full fine-tuning of some of the model's weights, the others frozen.

Two ways to choose, which add up:

    freeze_trainable_layers N     the last N decoder layers (negative: the first N), LLaMA-Factory's freeze
      freeze_trainable_modules      of those layers, only these modules (mlp, self_attn, mlp.down_proj; all)
      freeze_extra_modules          and these modules outside the layers (embed_tokens, norm, lm_head)
    unfrozen_parameters [REGEX]   the parameters whose names match, from the start (Axolotl's)

`trainable_names` picks the parameters from the model's own names (on a weightless skeleton for the checks, the
dry run and the memory estimate; on the loaded model for training), and says in one line what names nothing. Only
the chosen parameters get gradients and optimizer states; the layers before the first trained one keep no
activations. Under mixed precision the frozen weights stay in the half type, as a LoRA run's frozen base does (not
under FSDP or DeepSpeed, which shard a layer's weights in one dtype), and the trained ones in fp32.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import yaml

from tunelab.config.base import RunParams
from tunelab.env import distributed_kind
from tunelab.errors import ConfigError


def is_freezing(params: RunParams) -> bool:
    """Whether the run trains only some of the weights (freeze_trainable_layers or unfrozen_parameters)."""
    return params.freeze_trainable_layers is not None or params.unfrozen_parameters is not None


@dataclass
class Choice:
    """What a freeze run trains: its parameters' names and sizes, and the first decoder layer that keeps its
    activations for the backward pass (0 when the embeddings train; the number of layers when none trains)."""

    names: list[str]
    trained: int  # numbers trained
    total: int  # numbers in the model
    first_layer: int
    layers: int
    embeddings: bool  # whether the input embeddings train
    head: bool  # whether the output head trains (a causal LM's; a classifier's new head always does)

    def describe(self) -> str:
        share = self.trained / max(self.total, 1)
        return f"{self.trained:,} of {self.total:,} parameters ({share:.1%})"


def decoder_layers(model: Any) -> tuple[str, int] | None:
    """(the name of the model's list of decoder layers, its length): the outermost ModuleList as long as the config's
    number of layers (a multimodal model's language layers, not its vision tower's nor a layer's experts), or None."""
    from torch import nn

    config = model.config.get_text_config()
    count = next(
        (getattr(config, k) for k in ("num_hidden_layers", "num_layers", "n_layer") if getattr(config, k, 0)), 0
    )
    lists = [
        name for name, module in model.named_modules() if isinstance(module, nn.ModuleList) and len(module) == count
    ]
    return (min(lists, key=lambda name: name.count(".")), count) if lists else None


def trainable_names(model: Any, params: RunParams) -> Choice:
    """The parameters a freeze run trains, by their names in `model` (tied weights under each of their names)."""
    found = decoder_layers(model)
    if found is None and (params.freeze_trainable_layers is not None or params.freeze_extra_modules):
        setting = "freeze_trainable_layers" if params.freeze_trainable_layers is not None else "freeze_extra_modules"
        raise ConfigError(
            f"{setting}: {type(model).__name__} has no list of decoder layers found from its config; name the "
            "parameters with unfrozen_parameters instead"
        )
    prefix, count = found or ("", 0)
    towers = other_towers(model, prefix)  # a multimodal model's vision tower: not on the language model's path
    named = list(model.named_parameters(remove_duplicate=False))
    new_head = {name for name, _ in named if _new_head(model, name)}
    chosen = set(new_head)
    if params.freeze_trainable_layers is not None:
        chosen |= _from_layers(named, prefix, count, params)
    if params.freeze_extra_modules:
        chosen |= _extra_modules(model, named, prefix, towers, params.freeze_extra_modules)
    for pattern in params.unfrozen_parameters or ():
        matched = {name for name, _ in named if re.match(pattern, name)}
        if not matched:
            example = f", {prefix}.0.{_inner_name(named, prefix)}" if prefix else ""
            raise ConfigError(
                f"unfrozen_parameters: {pattern!r} matches no parameter of the model (they are named like "
                f"{named[0][0]}{example})"
            )
        chosen |= matched
    if not chosen - new_head:
        raise ConfigError("freeze training: the settings choose no parameter to train")
    # A tied weight (the head on the embeddings) is trained when any of its names is chosen.
    tensors = {id(tensor) for name, tensor in named if name in chosen}
    names = [name for name, tensor in named if id(tensor) in tensors]
    embedded, headed = (
        module is not None and any(id(p) in tensors for p in module.parameters())
        for module in (model.get_input_embeddings(), model.get_output_embeddings())
    )
    if all(_inside(name, towers) for name in names):
        raise ConfigError(
            f"freeze training: the chosen parameters ({names[0]}, ...) are all in {', '.join(towers)}, off the "
            "language model's path: the loss would not reach them"
        )
    unique = {id(tensor): tensor for _, tensor in named}
    trained = sum(tensor.numel() for key, tensor in unique.items() if key in tensors)
    total = sum(tensor.numel() for tensor in unique.values())
    if prefix:
        layer_of = re.compile(re.escape(prefix) + r"\.(\d+)\.")
        layers = [int(m.group(1)) for name in names if (m := layer_of.match(name))]
        first = 0 if embedded else min(layers, default=count)
    else:
        first = 0  # (layers not found: every one counted as keeping its activations)
    return Choice(names, trained, total, first, count, embedded, headed)


def _new_head(model: Any, name: str) -> bool:
    """Whether a parameter is a sequence classifier's new head (score, classifier, DistilBERT's pre_classifier,
    BART's classification_head, XLNet's sequence_summary...): every top-level module of it but its base model,
    which always trains (LoRA's modules_to_save does the same for PEFT)."""
    top = name.split(".")[0]
    base = getattr(model, "base_model_prefix", "") or ""
    if type(model).__name__.endswith("ForSequenceClassification") and base and hasattr(model, base):
        return top != base
    return top.endswith(("score", "classifier"))  # (a remote-code class: the usual head names, as PEFT's SEQ_CLS)


def _inner_name(named: list[tuple[str, Any]], prefix: str) -> str:
    start = f"{prefix}.0."
    return next((name.removeprefix(start) for name, _ in named if name.startswith(start)), "...")


def _from_layers(named: list[tuple[str, Any]], prefix: str, count: int, params: RunParams) -> set[str]:
    n = params.freeze_trainable_layers
    if n == 0 or abs(n) > count:
        raise ConfigError(
            f"freeze_trainable_layers: {n} layers of a model of {count}: give 1 to {count} (the last ones) or -1 to "
            f"-{count} (the first ones)"
        )
    indices = range(count - n, count) if n > 0 else range(-n)
    wanted = [m.strip() for m in str(params.freeze_trainable_modules or "all").split(",") if m.strip()]
    # Each chosen layer's parameters, by their names inside it (layers may differ: linear and full attention, dense
    # and expert MLPs): a module counts when one of the chosen layers has it.
    inside = {}
    for name, _ in named:
        for index in indices:
            rest = name.removeprefix(f"{prefix}.{index}.")
            if rest != name:
                inside[name] = rest
    chosen = set()
    for module in wanted:
        matched = {
            n for n, rest in inside.items() if module == "all" or rest == module or rest.startswith(module + ".")
        }
        if not matched:
            modules = sorted({rest.split(".")[0] for rest in inside.values()})
            which, it = ("layers have", "they have") if len(indices) > 1 else ("layer has", "it has")
            raise ConfigError(
                f"freeze_trainable_modules: the chosen decoder {which} no module {module!r}; {it} "
                f"{', '.join(modules)} (or all)"
            )
        chosen |= matched
    return chosen


def other_towers(model: Any, prefix: str) -> list[str]:
    """The modules beside the language model that hold layers of their own (a vision tower beside
    model.language_model), which its loss does not reach; none for a text model (a BERT's embeddings and pooler, a
    causal LM's head hold no layers)."""
    from torch import nn

    if not prefix:
        return []
    text_root = prefix.rpartition(".")[0]
    parent = text_root.rpartition(".")[0]
    base = model.get_submodule(parent) if parent else model
    towers = []
    for name, child in base.named_children():
        key = f"{parent}.{name}" if parent else name
        if key != text_root and any(isinstance(module, nn.ModuleList) for module in child.modules()):
            towers.append(key)
    return towers


def _inside(name: str, keys: list[str]) -> bool:
    return any(name == key or name.startswith(key + ".") for key in keys)


def _extra_modules(model: Any, named: list[tuple[str, Any]], prefix: str, towers: list[str], spec: str) -> set[str]:
    """The parameters of modules outside the decoder layers and the other towers, named by their last part (norm)
    or whole (model.norm)."""
    outside = []
    for key, module in model.named_modules():
        if key and not _inside(key, [prefix, *towers]):
            outside.append((key, module))
    chosen = set()
    for wanted in (m.strip() for m in spec.split(",") if m.strip()):
        keys = [key for key, _ in outside if key == wanted or key.endswith("." + wanted)]
        if not keys:
            tops = sorted({key for key, module in outside if any(True for _ in module.parameters(recurse=False))})
            raise ConfigError(
                f"freeze_extra_modules: the model has no module {wanted!r} outside its decoder layers; it has "
                f"{', '.join(k.rsplit('.', 1)[-1] for k in tops)}"
            )
        chosen |= {name for name, _ in named if any(name.startswith(key + ".") for key in keys)}
    return chosen


def frozen_in_half(params: RunParams) -> bool:
    """Whether a freeze run keeps its frozen weights in the mixed-precision half type: yes, unless FSDP or DeepSpeed
    shard them (one dtype a layer) - told by the launched process's environment, or by the accelerate config the
    run launches with (the parent's estimate and checks)."""
    if not is_freezing(params) or params.peft or params.mixed_precision not in ("bf16", "fp16"):
        return False
    return sharding(params) is None


def sharding(params: RunParams) -> dict[str, Any] | None:
    """How the run shards its weights ({"kind": "fsdp" or "deepspeed", "fsdp_version", "use_orig_params"}), or None."""
    kind = distributed_kind()
    if kind:  # inside a launched process: accelerate says so in the environment
        version = int(os.environ.get("FSDP_VERSION", "1"))
        orig = _true(os.environ.get("FSDP_USE_ORIG_PARAMS", "false"))
        return {"kind": kind, "fsdp_version": version, "use_orig_params": orig}
    if params.num_processes <= 1 and params.num_machines <= 1:
        return None
    from tunelab.launch import config_file

    try:
        config = yaml.safe_load(config_file(params).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None
    kind = {"FSDP": "fsdp", "DEEPSPEED": "deepspeed"}.get(str(config.get("distributed_type", "")))
    if kind is None:
        return None
    fsdp = config.get("fsdp_config") or {}

    def setting(name: str) -> Any:  # (accelerate reads fsdp_config's keys with or without the fsdp_ prefix)
        value = fsdp.get(f"fsdp_{name}", fsdp.get(name))
        return None if value in (None, "") else value

    try:
        version = int(setting("version") or 1)
    except (TypeError, ValueError):
        raise ConfigError(f"accelerate_config: fsdp_version {setting('version')!r} is not 1 or 2") from None
    # accelerate launch's own default is true (the FSDP1 flat parameters then keep their originals)
    orig = setting("use_orig_params")
    orig = True if orig is None else _true(orig)
    return {"kind": kind, "fsdp_version": version, "use_orig_params": orig}


def _true(value: Any) -> bool:
    """A boolean setting as accelerate reads one (its str_to_bool)."""
    return str(value).strip().lower() in ("y", "yes", "t", "true", "on", "1")


def check_sharding(params: RunParams) -> None:
    """FSDP1 with use_orig_params false flattens each wrapped layer's parameters into one that all must train or
    not: a freeze run that trains part of a layer (a module, a norm beside frozen embeddings) cannot run there."""
    shards = sharding(params) if is_freezing(params) else None
    if shards and shards["kind"] == "fsdp" and shards["fsdp_version"] == 1 and not shards["use_orig_params"]:
        raise ConfigError(
            "freeze training under FSDP1 needs fsdp_use_orig_params: true in the accelerate config (accelerate's "
            "default; its flat parameters train whole), or fsdp_version: 2"
        )


def freeze(model: Any, params: RunParams, half: Any = None) -> Choice:
    """Freeze every parameter the settings do not choose; the chosen ones in fp32 (the others in `half`, the
    mixed-precision type, when given)."""
    import torch

    choice = trainable_names(model, params)
    chosen = set(choice.names)
    for name, tensor in model.named_parameters(remove_duplicate=False):
        trained = name in chosen
        tensor.requires_grad_(trained)
        wanted = torch.float32 if trained or half is None else half
        if tensor.is_floating_point() and tensor.dtype != wanted:
            tensor.data = tensor.data.to(wanted)
    return choice
