"""What a training method declares: the model it trains, how tokenized data becomes rows, and its loss.

The shared machinery (data loading, model loading, the Trainer, outputs) never changes when a method is added;
a method is one file defining a `Method` plus one line in `methods/__init__.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RowStats:
    """What building the rows did to the examples, for the log and the dry run."""

    examples: int = 0
    rows: int = 0
    truncated: int = 0
    dropped: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PairEvaluation:
    """How `tunelab evaluate` measures a preference method on pairs or labeled answers
    (inference/evaluate_preference.py reads the rows and scores them; the method says what the scores mean)."""

    # (params, rows, pairs, policy, reference) -> the method's figures from its own loss function, over every row
    # at once. policy and reference: (sums, counts) of each row's answer log-probs, (N, 2) for pairs, (N, 1) for
    # labeled answers; reference None for a method without one. pairs: labeled answers read from pairs, each
    # pair's (desirable, undesirable) row, else None.
    figures: Callable[[Any, list[Any], Any, Any, Any], dict[str, Any]]
    beta: str  # the LLMParams field the method's rewards are scaled by
    rewards: str  # what the rewards are, for the report
    # params -> how the method sums a batch's per-token answer log-probs into (sums, counts), when not plainly
    # (methods/preference.sequence_sums): dpo's LD-DPO weighting
    summed: Callable[[Any], Callable[[Any, Any], tuple[Any, Any]]] | None = None


# What a preference method's rewards are (PairEvaluation.rewards), in the two kinds TRL's trainers log.
REFERENCE_REWARDS = "beta x (log p - log p_ref), summed over the answer tokens (dpo's ld_alpha: weighted as trained)"
PER_TOKEN_REWARDS = "beta x the mean log-prob per answer token (logps/*: that mean)"


@dataclass(frozen=True)
class Method:
    """A training method.

    `build_rows` turns the tokenized data into training rows (an Encoded, a list of Encoded packed into one row,
    or a Pair) and reports what it did. `model_kind` is "causal_lm" or "reward" (a sequence classifier with one
    output). `trainer_class` is the Trainer that computes its loss (None: the next-token loss of
    training/trainer.TunelabTrainer). `name` and `data` (what it trains on: "examples" or "pairs") are filled in
    from its line in methods/__init__.REGISTRY, the one place that says them. `rows_with_model`, when given, is
    called once the model is loaded, before training, as (model, train_rows, valid_rows, params, prepared-data
    folder) -> (train_rows, valid_rows): what the rows need from the model (dpo: the reference's log-probs).
    `evaluation`: how `tunelab evaluate` measures a preference method (None: as a language model, or as the
    reward model it trains). `images`: it trains a vision-language model on rows that show images (data/images.py);
    `rows_with_model` is then also given the run's ImageCodec as `images`.
    """

    model_kind: str
    build_rows: Callable[[list[Any], Any], tuple[list[Any], RowStats]]
    trainer_class: type | None = None
    rows_with_model: Callable[..., tuple[list[Any], list[Any] | None]] | None = None
    evaluation: PairEvaluation | None = None
    perplexity: bool = True  # exp(loss) is a perplexity: the loss is the next-token cross-entropy (not distill's)
    images: bool = False
    name: str = ""
    data: str = "examples"
