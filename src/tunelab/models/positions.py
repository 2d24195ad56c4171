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

import logging
import math
from typing import Any

from tunelab.errors import ConfigError

log = logging.getLogger("tunelab")


def rope_scaling_of(config: Any, params: Any, model_name: str, required: bool = True) -> dict[str, Any] | None:
    """What `params.rope_scaling` makes of this model's positions: {"rope_type", "factor",
    "original_max_position_embeddings"}, or None when the run stretches nothing. ConfigError for a model it cannot
    stretch (no rotary positions, a scaling of its own, one per layer type) and for nothing to stretch; with
    `required` false (a reference model, which only has to reach as far as the model trained) None for the last."""
    kind = getattr(params, "rope_scaling", None)
    if not kind:
        return None
    config = config.get_text_config()
    rope = getattr(config, "rope_parameters", None)
    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(rope, dict) or not isinstance(positions, int):
        raise ConfigError(
            f"rope_scaling: model {model_name} has no rotary positions to stretch (learned position embeddings "
            "have a fixed count); leave rope_scaling out and keep block_size within its positions"
        )
    if "rope_type" not in rope:  # one set per layer type (Gemma 3's local and global layers)
        raise ConfigError(
            f"rope_scaling: model {model_name} keeps rotary settings per layer type ({', '.join(rope)}), which "
            "tunelab does not stretch; leave rope_scaling out"
        )
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(
            f"rope_scaling: model {model_name} already scales its positions ({rope['rope_type']}, factor "
            f"{rope.get('factor')}, {positions} positions); leave rope_scaling out"
        )
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
    return {"rope_type": kind, "factor": float(factor), "original_max_position_embeddings": positions}


def stretch_config(config: Any, scaling: dict[str, Any]) -> None:
    """Set `scaling` (rope_scaling_of's) in a model config, in place: its rope type and factor, and as many
    positions as the factor reaches."""
    config = config.get_text_config()
    rope = {key: value for key, value in config.rope_parameters.items() if key != "original_max_position_embeddings"}
    rope.update(rope_type=scaling["rope_type"], factor=scaling["factor"])
    if scaling["rope_type"] == "yarn":  # YaRN's ramp is measured against the trained length
        rope["original_max_position_embeddings"] = scaling["original_max_position_embeddings"]
    config.rope_parameters = rope
    config.max_position_embeddings = int(scaling["original_max_position_embeddings"] * scaling["factor"])


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
    reach = int(original * scaling["factor"])
    return f"rotary {scaling['rope_type']} scaling x{scaling['factor']:g}, {original} -> {reach} positions"
