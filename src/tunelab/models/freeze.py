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

import re
from dataclasses import dataclass
from typing import Any

from tunelab.config.base import RunParams
from tunelab.errors import ConfigError

NEW_HEADS = ("score", "classifier")  # (models/checks.CLASSIFIER_HEADS)


def is_freezing(params: RunParams) -> bool:
    """Whether the run trains only some of the weights (freeze_trainable_layers or unfrozen_parameters)."""
    return (
        getattr(params, "freeze_trainable_layers", None) is not None
        or getattr(params, "unfrozen_parameters", None) is not None
    )


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


def decoder_layers(model: Any) -> tuple[str, int]:
    """(the name of the model's list of decoder layers, its length): the outermost ModuleList as long as the config's
    number of layers (not a layer's list of experts); ConfigError for a model without one."""
    from torch import nn

    config = model.config.get_text_config()
    count = next(
        (getattr(config, k) for k in ("num_hidden_layers", "num_layers", "n_layer") if getattr(config, k, 0)), 0
    )
    lists = [
        name for name, module in model.named_modules() if isinstance(module, nn.ModuleList) and len(module) == count
    ]
    if not lists:
        raise ConfigError(
            f"freeze training: {type(model).__name__} has no list of {count} decoder layers to choose from"
        )
    return min(lists, key=lambda name: name.count(".")), count


def trainable_names(model: Any, params: RunParams) -> Choice:
    """The parameters a freeze run trains, by their names in `model` (tied weights under each of their names)."""
    prefix, count = decoder_layers(model)
    named = list(model.named_parameters(remove_duplicate=False))
    # A sequence classifier's head is new: it always trains (as PEFT's modules_to_save does under LoRA).
    chosen = {name for name, _ in named if name.split(".")[0] in NEW_HEADS}
    if params.freeze_trainable_layers is not None:
        chosen |= _from_layers(named, prefix, count, params)
    if params.freeze_extra_modules:
        chosen |= _extra_modules(model, named, prefix, params.freeze_extra_modules)
    for pattern in params.unfrozen_parameters or ():
        matched = {name for name, _ in named if re.match(pattern, name)}
        if not matched:
            raise ConfigError(
                f"unfrozen_parameters: {pattern!r} matches no parameter of the model (they are named like "
                f"{named[0][0]}, {prefix}.0.{_inner_name(named, prefix)})"
            )
        chosen |= matched
    if not chosen - {name for name, _ in named if name.split(".")[0] in NEW_HEADS}:
        raise ConfigError("freeze training: the settings choose no parameter to train")
    # A tied weight (the head on the embeddings) is trained when any of its names is chosen.
    tensors = {id(tensor) for name, tensor in named if name in chosen}
    names = [name for name, tensor in named if id(tensor) in tensors]
    unique = {id(tensor): tensor for _, tensor in named}
    trained = sum(tensor.numel() for key, tensor in unique.items() if key in tensors)
    total = sum(tensor.numel() for tensor in unique.values())
    layer_of = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    layers = [int(m.group(1)) for name in names if (m := layer_of.match(name))]
    embedded, headed = (
        module is not None and any(id(p) in tensors for p in module.parameters())
        for module in (model.get_input_embeddings(), model.get_output_embeddings())
    )
    first = 0 if embedded else min(layers, default=count)
    return Choice(names, trained, total, first, count, embedded, headed)


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
    start = f"{prefix}.0."
    inner = [name.removeprefix(start) for name, _ in named if name.startswith(start)]
    modules = sorted({name.split(".")[0] for name in inner})
    for module in wanted:
        if module != "all" and not any(name == module or name.startswith(module + ".") for name in inner):
            raise ConfigError(
                f"freeze_trainable_modules: a decoder layer has no module {module!r}; it has {', '.join(modules)} "
                "(or all)"
            )
    chosen = set()
    for name, _ in named:
        for index in indices:
            rest = name.removeprefix(f"{prefix}.{index}.")
            if rest != name and any(w == "all" or rest == w or rest.startswith(w + ".") for w in wanted):
                chosen.add(name)
    return chosen


def _extra_modules(model: Any, named: list[tuple[str, Any]], prefix: str, spec: str) -> set[str]:
    """The parameters of modules outside the decoder layers named by their last part (norm) or whole (model.norm)."""
    outside = [(key, module) for key, module in model.named_modules() if key and not key.startswith(prefix + ".")]
    outside = [(key, module) for key, module in outside if key != prefix]
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
