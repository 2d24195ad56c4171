"""A mixture of experts' load-balancing loss, as a run adds it to its loss (GuardedTrainer.add_balancing)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The weight of a mixture of experts' load-balancing loss in the run's loss: an attribute of the model (PEFT's
# wrappers pass it through), never of its config, which is saved with the model and read by every later use.
ROUTER_AUX = "_tunelab_router_aux"


@dataclass(frozen=True)
class Balancing:
    """A mixture of experts' load-balancing loss as the run adds it: its weight, and the model's own function
    (its modeling module's `load_balancing_loss_func(gate_logits, num_experts, top_k, attention_mask)`) with the
    model's expert counts, found at load time (a wrapper such as FSDP2's may change the model's class later)."""

    weight: float
    function: Any
    experts: int
    top_k: int


def balancing_loss(model_class: type) -> Any:
    """The model class's load-balancing loss function, called as its forward calls it, or None: a class without
    one (dense models; DeepSeek-V3 and Llama 4 route without one), or one whose function takes other arguments."""
    import inspect
    import sys

    function = getattr(sys.modules.get(model_class.__module__), "load_balancing_loss_func", None)
    if function is None:
        return None
    names = list(inspect.signature(function).parameters)[:4]
    return function if names == ["gate_logits", "num_experts", "top_k", "attention_mask"] else None
