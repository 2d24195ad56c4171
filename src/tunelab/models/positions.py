"""Training rows longer than a model's positions: its rotary positions stretched (rope_scaling: linear or yarn).

A RoPE model turns each position into angles; past the length it was trained on, the angles are ones it never saw.
Linear scaling (position interpolation) divides every position by the factor, so the longer row's angles stay
within the trained range; YaRN divides only the slow-turning frequencies and keeps the fast ones, which keeps the
short-range order sharp, and scales the attention logits a little. Either way the model then learns the new
spacing from the run's rows: this is context extension by fine-tuning (LLaMA-Factory's rope_scaling, Axolotl's).

The stretch is a change of the config (`rope_parameters`, `max_position_embeddings`), so a full fine-tune saves it
in config.json and every later load (generate, serve, merge, the GGUF export) reads it from there. An adapter
leaves the base's config as it was: the run records the stretch (tunelab_run.json) and `outputs.load_base` applies
it to the base again before the adapter goes on.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

from tunelab.errors import ConfigError

log = logging.getLogger("tunelab")


def rope_parameters(config: Any) -> dict[str, Any]:
    """A config's RoPE settings, a copy: transformers 5 keeps them in rope_parameters (per layer type for Gemma 3),
    4.x in rope_scaling; {} for a model without rotary positions."""
    return dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})


def rope_scaling_of(config: Any, params: Any, model_name: str, required: bool = True) -> dict[str, Any] | None:
    """What `params.rope_scaling` makes of this model's positions: {"rope_type", "factor",
    "original_max_position_embeddings"}, or None when the run stretches nothing. ConfigError for a model it cannot
    stretch (no rotary positions, a scaling of its own, one per layer type, a config transformers then refuses),
    for nothing to stretch, and for a factor that does not reach block_size.

    `required` false: a reference model (model_ref), stretched as the model trained is where it can be, and left
    as it is (None) where it cannot or where it reaches block_size without a factor given."""
    kind = getattr(params, "rope_scaling", None)
    if not kind:
        return None
    config = config.get_text_config()
    rope = rope_parameters(config)
    positions = getattr(config, "max_position_embeddings", None)
    problem = None
    if not rope or not isinstance(positions, int):
        problem = (
            "has no rotary positions to stretch (learned position embeddings have a fixed count); leave rope_scaling "
            "out and keep block_size within its positions"
        )
    elif "rope_type" not in rope:  # one set per layer type (Gemma 3's local and global layers)
        problem = f"keeps rotary settings per layer type ({', '.join(rope)}), which tunelab does not stretch"
    elif rope["rope_type"] != "default":
        problem = (
            f"already scales its positions ({rope['rope_type']}, factor {rope.get('factor')}, {positions} "
            "positions); leave rope_scaling out"
        )
    if problem:
        if not required:
            return None
        raise ConfigError(f"rope_scaling: model {model_name} {problem}")
    factor = params.rope_scaling_factor
    if factor is None:
        if params.block_size <= positions:
            if not required:
                return None
            raise ConfigError(
                f"rope_scaling: block_size {params.block_size} fits within the {positions} positions of model "
                f"{model_name}: nothing to stretch. Raise block_size past it, or give rope_scaling_factor to stretch "
                "anyway"
            )
        factor = float(math.ceil(params.block_size / positions))  # whole factors, as LLaMA-Factory chooses them
    scaling = {"rope_type": kind, "factor": float(factor), "original_max_position_embeddings": positions}
    if reach(scaling) < params.block_size:
        raise ConfigError(
            f"rope_scaling_factor {factor:g} stretches the {positions} positions of model {model_name} to "
            f"{reach(scaling)}, short of block_size {params.block_size}: give at least "
            f"{math.ceil(params.block_size / positions)}, or leave it out to have it worked out"
        )
    _check_transformers_takes(config, scaling, model_name)
    return scaling


def reach(scaling: dict[str, Any]) -> int:
    """How many positions a stretched model has: the original count times the factor."""
    return round(scaling["original_max_position_embeddings"] * scaling["factor"])


def _check_transformers_takes(config: Any, scaling: dict[str, Any], model_name: str) -> None:
    """ConfigError unless transformers validates the stretched config and reads it back the same from its saved
    form (Phi-3's config takes longrope only, and would fail at the first checkpoint)."""
    stretched = copy.deepcopy(config)
    stretch_config(stretched, scaling)
    try:
        stretched.validate()
        again = type(stretched).from_dict(stretched.to_dict()).rope_parameters
    except Exception as err:  # noqa: BLE001 - transformers raises several kinds; the last line says why
        reason = str(err).strip().splitlines()[-1].strip()
        raise ConfigError(
            f"rope_scaling: model {model_name} ({config.model_type}) does not take {scaling['rope_type']} scaling: "
            f"transformers refuses its config ({reason})"
        ) from None
    if not isinstance(again, dict) or again.get("rope_type") != scaling["rope_type"]:
        raise ConfigError(
            f"rope_scaling: model {model_name} ({config.model_type}) does not keep {scaling['rope_type']} scaling: "
            "transformers reads its saved config back otherwise"
        )


def stretch_config(config: Any, scaling: dict[str, Any]) -> None:
    """Set `scaling` (rope_scaling_of's) in a model config, in place: its rope type and factor, and as many
    positions as the factor reaches."""
    config = config.get_text_config()
    rope = {key: value for key, value in config.rope_parameters.items() if key != "original_max_position_embeddings"}
    rope.update(rope_type=scaling["rope_type"], factor=scaling["factor"])
    if scaling["rope_type"] == "yarn":  # YaRN's ramp is measured against the trained length
        rope["original_max_position_embeddings"] = scaling["original_max_position_embeddings"]
        if getattr(config, "head_dim", 0) is None:  # Mixtral: YaRN reads head_dim without the usual fallback
            config.head_dim = config.hidden_size // config.num_attention_heads
    config.rope_parameters = rope
    config.max_position_embeddings = reach(scaling)


def stretch_model(model: Any, scaling: dict[str, Any] | None) -> Any:
    """The loaded `model` with its positions stretched by `scaling` (None: as it is): the config changed, and each
    rotary embedding module built again from it (its frequencies are computed once, when it is made)."""
    if not scaling:
        return model
    stretch_config(model.config, scaling)
    rebuilt = 0
    for name, module in list(model.named_modules()):
        frequencies = getattr(module, "inv_freq", None)
        if frequencies is None or not hasattr(module, "rope_type"):
            continue
        fresh = type(module)(module.config).to(frequencies.device)
        model.set_submodule(name, fresh)
        rebuilt += 1
    if not rebuilt:
        raise ConfigError(
            f"rope_scaling: {type(model).__name__} has no rotary embedding module tunelab can rebuild; leave "
            "rope_scaling out"
        )
    log.info("positions: %s", described(scaling))
    return model


def described(scaling: dict[str, Any]) -> str:
    """ "rotary yarn scaling x4, 2048 -> 8192 positions", for the log and the dry run."""
    original = scaling["original_max_position_embeddings"]
    return f"rotary {scaling['rope_type']} scaling x{scaling['factor']:g}, {original} -> {reach(scaling)} positions"
