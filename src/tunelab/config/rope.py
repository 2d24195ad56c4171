"""`rope_scaling` as given: a name (LLaMA-Factory's), or Axolotl's {type, factor}. models/positions.py applies it."""

from __future__ import annotations

import math

from tunelab.config.base import Params
from tunelab.errors import ConfigError


def read_rope_scaling(params: Params) -> None:
    """rope_scaling as a name (LLaMA-Factory's) or as Axolotl's {type, factor}, which sets the factor too."""
    if isinstance(params.rope_scaling, dict):
        given = dict(params.rope_scaling)
        kinds = {given.pop(key) for key in ("type", "rope_type") if key in given}
        factor = given.pop("factor", None)
        if "original_max_position_embeddings" in given:
            raise ConfigError(
                "rope_scaling: original_max_position_embeddings is the model's own max_position_embeddings, read "
                "from its config: leave it out"
            )
        if given or len(kinds) != 1 or not isinstance(next(iter(kinds)), str):
            what = ", ".join(given) if given else "no type" if not kinds else f"types {sorted(map(str, kinds))}"
            raise ConfigError(f"rope_scaling: expected linear or yarn, or {{type, factor}}; got {what}")
        kind = kinds.pop()
        if factor is not None and params.rope_scaling_factor not in (None, factor):
            raise ConfigError(
                f"rope_scaling's factor ({factor}) and rope_scaling_factor ({params.rope_scaling_factor}) differ"
            )
        params.rope_scaling = kind
        params.rope_scaling_factor = params.rope_scaling_factor if factor is None else factor
    if isinstance(params.rope_scaling, str):
        params.rope_scaling = params.rope_scaling.strip().lower()
    if params.rope_scaling_factor is None:
        return
    if not params.rope_scaling:
        raise ConfigError("rope_scaling_factor needs rope_scaling (linear or yarn) to say how to stretch")
    if isinstance(params.rope_scaling_factor, bool) or not isinstance(params.rope_scaling_factor, (int, float)):
        raise ConfigError(f"rope_scaling_factor: expected a number above 1, got {params.rope_scaling_factor!r}")
    if not 1 < params.rope_scaling_factor < math.inf:
        raise ConfigError(f"rope_scaling_factor must be above 1 (it stretches), got {params.rope_scaling_factor}")
    params.rope_scaling_factor = float(params.rope_scaling_factor)
