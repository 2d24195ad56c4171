"""generation_kwargs (TRL's): which of generate's settings a sampling run (grpo, rloo, online_dpo) passes on, and
the form each must have, checked when the config is read (config/method_checks.check_sampled) so that a bad value
is refused by the dry run in one line, never a traceback inside generate. The token ids are checked against the
model when the trainer starts (methods/completions.CompletionSampler._check_generation_settings)."""

from __future__ import annotations

import json
import math

from tunelab.errors import ConfigError

# generate's settings that have a setting of their own here (grpo's loss scores the completions at the sampling
# temperature: the two must agree).
GENERATION_OWN = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_completion_length",
    "max_length": "max_completion_length",
}


def _token_ids(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)


def _finite(value: object, low: float = -math.inf, high: float = math.inf) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number and math.isfinite(value) and low <= value <= high


# The rest of generate's settings tunelab passes on, each with the form it must have (checked here, so that a bad
# value is refused by the dry run, never a traceback inside generate). Others are refused: those tunelab sets (the
# group, the end tokens, what generate returns), those that would not sample the policy alone (beams, assisted
# decoding, guidance) or would hide how a completion ended (a forced end token, a clock), stop_strings.
GENERATION_SETTINGS = {
    "no_repeat_ngram_size": ("a whole number, 0 or more", lambda v: _token_ids([v])),
    "min_new_tokens": ("a whole number, 0 or more", lambda v: _token_ids([v])),
    "suppress_tokens": ("a list of token ids", _token_ids),
    "begin_suppress_tokens": ("a list of token ids", _token_ids),
    "bad_words_ids": (
        "a list of token id lists",
        lambda v: isinstance(v, list) and all(_token_ids(ids) and ids for ids in v),
    ),
    "sequence_bias": (
        "a list of [token id list, finite bias] pairs",
        lambda v: (
            isinstance(v, list)
            and bool(v)
            and all(isinstance(p, list) and len(p) == 2 and _token_ids(p[0]) and p[0] and _finite(p[1]) for p in v)
        ),
    ),
    "typical_p": ("a number in (0, 1]", lambda v: _finite(v, 0.0, 1.0) and v > 0),
    "epsilon_cutoff": ("a number in [0, 1)", lambda v: _finite(v, 0.0, 1.0) and v < 1),
    "eta_cutoff": ("a number in [0, 1)", lambda v: _finite(v, 0.0, 1.0) and v < 1),
    "exponential_decay_length_penalty": (
        "[start index, factor of 1 or more]",
        lambda v: isinstance(v, list) and len(v) == 2 and _token_ids(v[:1]) and _finite(v[1], 1.0, 1e3),
    ),
    "renormalize_logits": ("true or false", lambda v: isinstance(v, bool)),
}
# Settings that are tunelab's own as they are (nothing to pass on)
GENERATION_AS_IS = {"do_sample": True, "num_beams": 1}


def generation_settings(value: str | dict | None, longest: int = 256) -> dict | None:
    """generation_kwargs (TRL's) as a dict of generate's settings (a JSON object on the command line), None when
    unset; ConfigError in one line for a name with a setting of its own here (GENERATION_OWN) or not among those
    tunelab passes on (GENERATION_SETTINGS), a value not of its form, or a min_new_tokens of `longest` tokens or
    more (the completion length: no completion could end)."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else None
        except json.JSONDecodeError as err:
            raise ConfigError(f"generation_kwargs: not a JSON object ({err.msg}): {value!r}") from None
    if not value:
        return None
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise ConfigError('generation_kwargs must be an object of generate settings, e.g. {"no_repeat_ngram_size": 3}')
    kept = {}
    for key, item in value.items():
        if key in GENERATION_OWN:
            raise ConfigError(f"generation_kwargs: {key} has a setting of its own, {GENERATION_OWN[key]}: set that")
        if key in GENERATION_AS_IS and item == GENERATION_AS_IS[key] and type(item) is type(GENERATION_AS_IS[key]):
            continue
        if key not in GENERATION_SETTINGS:
            raise ConfigError(
                f"generation_kwargs: {key} is not one tunelab passes to generate (its own: num_return_sequences, the "
                "end tokens, do_sample and num_beams as they are; what would not sample the policy alone or hide how "
                f"a completion ended is refused; the others: {', '.join(GENERATION_SETTINGS)})"
            )
        form, valid = GENERATION_SETTINGS[key]
        if not valid(item):
            raise ConfigError(f"generation_kwargs: {key} must be {form}, got {json.dumps(item)}")
        if key == "min_new_tokens" and item >= longest:
            raise ConfigError(
                f"generation_kwargs: min_new_tokens {item} leaves no completion room to end before "
                f"max_completion_length ({longest})"
            )
        kept[key] = [[ids, float(bias)] for ids, bias in item] if key == "sequence_bias" else item
    return kept or None
