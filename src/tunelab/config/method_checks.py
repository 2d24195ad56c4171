"""The checks of each method's own settings (LLMParams.validate calls them): a value that cannot work, or one
the run's method would never read, is refused in one line before anything loads."""

from __future__ import annotations

import math
from dataclasses import fields

from tunelab.config.base import Params, listed_tokens
from tunelab.config.generation import generation_settings
from tunelab.errors import ConfigError
from tunelab.methods import (
    DPO_DIVERGENCE_LOSSES,
    DPO_LOSS_TYPES,
    DPO_SMOOTHED_LOSSES,
    REGISTRY,
    readers,
    uses_reference,
)
from tunelab.user_code import is_dotted


def _given(params: Params, name: str) -> bool:
    """Whether the run sets `name` away from its default."""
    default = next(f.default for f in fields(params) if f.name == name)
    return getattr(params, name) != default


def check_synced_reference(params: Params) -> None:
    """TR-DPO mixes the model's weights into the reference's: it needs a reference with the model's own weights."""
    if not params.sync_ref_model:
        for name in ("ref_model_mixup_alpha", "ref_model_sync_steps"):
            if _given(params, name):
                raise ConfigError(f"{name} is read with sync_ref_model only: leave it out, or turn it on")
        return
    if not 0 < params.ref_model_mixup_alpha <= 1:
        raise ConfigError(f"ref_model_mixup_alpha must be in (0, 1], got {params.ref_model_mixup_alpha}")
    if isinstance(params.ref_model_sync_steps, bool) or not isinstance(params.ref_model_sync_steps, int):
        raise ConfigError(f"ref_model_sync_steps must be a whole number, got {params.ref_model_sync_steps!r}")
    if params.ref_model_sync_steps < 1:
        raise ConfigError(f"ref_model_sync_steps must be at least 1, got {params.ref_model_sync_steps}")
    why = None
    if params.peft:
        why = "with LoRA the model is the base and an adapter, which no reference can be mixed with (as TRL)"
    elif REGISTRY[params.trainer].data == "prompts" and params.beta == 0:
        why = f"it moves the reference of {params.trainer}'s KL term, and with beta 0 there is none: give beta"
    elif params.precompute_ref_log_probs:
        why = "precompute_ref_log_probs scores with the starting reference once; a moving one would make them stale"
    elif params.early_stopping_patience is not None:
        why = "early stopping compares eval losses measured against references that moved between them"
    elif params.distributed_backend in ("fsdp", "deepspeed"):
        why = f"{params.distributed_backend} shards the model's weights, which the reference's whole copy cannot mix"
    if why:
        raise ConfigError(f"sync_ref_model: {why}")


def check_own_settings(params: Params) -> None:
    """A setting one method reads and no other (the registry's `Entry.own`), given to another trainer, would change
    nothing, silently: refused. (AutoTrain's own settings are shared: its configs carry dpo_beta or
    max_prompt_length whatever the trainer.)"""
    for name, trainers in readers().items():
        if params.trainer not in trainers and _given(params, name):
            which = f"trainer {trainers[0]}" if len(trainers) == 1 else f"trainers {', '.join(trainers[:-1])}"
            which += f" and {trainers[-1]}" if len(trainers) > 1 else ""
            hint = " (dpo's is dpo_beta, kto's kto_beta)" if name == "beta" else ""
            raise ConfigError(f"{name} is read by {which}, not {params.trainer}: leave it out{hint}")


def check_dpo(params: Params) -> None:
    """dpo's loss variants beyond the loss type: DiscoPOP's temperature, f-DPO's divergence, LD-DPO, WPO."""
    if _given(params, "discopop_tau") and "discopop" not in params.dpo_loss_types:
        raise ConfigError("discopop_tau is read by dpo_loss_type discopop only: leave it out, or add that loss")
    if not 0 < params.discopop_tau < math.inf:
        raise ConfigError(f"discopop_tau must be positive, got {params.discopop_tau}")
    if "exo_pair" in params.dpo_loss_types and not params.label_smoothing:
        raise ConfigError(
            "dpo_loss_type exo_pair needs label_smoothing above 0 (its target puts that share on the rejected "
            "answer; the EXO paper uses 1e-3)"
        )
    if params.f_divergence_type != "reverse_kl":
        others = [kind for kind in params.dpo_loss_types if kind not in DPO_DIVERGENCE_LOSSES]
        if others:
            raise ConfigError(
                f"f_divergence_type {params.f_divergence_type} with dpo_loss_type {others[0]}: only the losses of "
                f"the chosen-rejected difference ({', '.join(DPO_DIVERGENCE_LOSSES)}) have an f-divergence form"
            )
    alpha = params.f_alpha_divergence_coef
    if _given(params, "f_alpha_divergence_coef") and params.f_divergence_type != "alpha_divergence":
        raise ConfigError("f_alpha_divergence_coef is read by f_divergence_type alpha_divergence only: leave it out")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ConfigError(f"f_alpha_divergence_coef must be a number, got {alpha!r}")
    if params.ld_alpha is not None and not 0 <= params.ld_alpha <= 1:
        raise ConfigError(
            f"ld_alpha must be in [0, 1] (1: every token counts fully, 0: none past the shorter answer), got "
            f"{params.ld_alpha}"
        )
    check_synced_reference(params)
    if params.use_weighting and {"aot", "aot_unpaired"} & set(params.dpo_loss_types):
        raise ConfigError(
            "use_weighting with the aot losses: they sort the batch's pairs, so a weight per pair would land on "
            "another pair; use one or the other"
        )


def check_sampled(params: Params) -> None:
    longest = params.max_completion_length or 256  # (methods/completions.completion_length)
    params.generation_kwargs = generation_settings(params.generation_kwargs, longest)
    if not params.reward_functions:
        raise ConfigError(
            f"{params.trainer} needs reward_functions (--reward-functions): built-ins such as "
            "answer_tag,format_tag, or my_rewards.py:my_function (docs/grpo.md)"
        )
    check_tools(params)
    per_call = params.prompts_per_generation
    if per_call is not None and (isinstance(per_call, bool) or not isinstance(per_call, int) or per_call < 1):
        raise ConfigError(f"prompts_per_generation must be a whole number, 1 or more, got {per_call!r}")
    if params.missing_eos_penalty is not None:
        _number(params, "missing_eos_penalty", 0.0)
    steps = params.steps_per_generation
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ConfigError(f"steps_per_generation must be a whole number, 1 or more, got {steps!r}")
    if steps is not None and steps % params.gradient_accumulation:
        raise ConfigError(
            f"steps_per_generation {steps} must be a multiple of gradient_accumulation "
            f"{params.gradient_accumulation}: tunelab samples whole optimizer steps (prompts_per_generation "
            "splits one sampling into several generate calls)"
        )
    evaluated = params.num_generations_eval
    if evaluated is not None and (isinstance(evaluated, bool) or not isinstance(evaluated, int) or evaluated < 1):
        raise ConfigError(f"num_generations_eval must be a whole number, 1 or more, got {evaluated!r}")
    if params.num_generations < 2:
        raise ConfigError(f"num_generations must be at least 2 (a group to compare), got {params.num_generations}")
    if params.temperature <= 0 or not 0 < params.top_p <= 1:
        raise ConfigError(f"{params.trainer} samples its completions: temperature must be > 0 and top_p in (0, 1]")
    if params.epsilon <= 0 or (params.epsilon_high is not None and params.epsilon_high <= 0):
        raise ConfigError("epsilon and epsilon_high must be positive")
    if params.beta < 0:
        raise ConfigError(f"beta must be 0 or positive, got {params.beta}")
    if isinstance(params.num_iterations, bool) or not isinstance(params.num_iterations, int):
        raise ConfigError(f"num_iterations must be a whole number, got {params.num_iterations!r}")
    if isinstance(params.reward_clip_range, (list, tuple)):  # a YAML list, or TRL's tuple
        params.reward_clip_range = ",".join(str(value) for value in params.reward_clip_range)
    if params.reward_clip_range is not None:
        try:
            low, high = params.reward_clip_values
        except ValueError:
            raise ConfigError(
                f"reward_clip_range: expected two numbers, min,max, got {params.reward_clip_range!r}"
            ) from None
        if not low < high:
            raise ConfigError(f"reward_clip_range: the min ({low:g}) must be below the max ({high:g})")
    if params.num_iterations < 1:
        raise ConfigError(f"num_iterations must be at least 1, got {params.num_iterations}")
    if params.loss_type == "cispo" and params.epsilon_high is None:
        raise ConfigError(
            "loss_type cispo caps each token's weight at epsilon_high (CISPO's epsilon_max; TRL suggests about 5): "
            "give epsilon_high (with epsilon's default, 0.2, every weight would be 0.2)"
        )
    for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
        if _given(params, name) and params.loss_type != "sapo":
            raise ConfigError(f"{name} is read by loss_type sapo only: leave it out, or use that loss")
        if not 0 < getattr(params, name) < math.inf:
            raise ConfigError(f"{name} must be positive, got {getattr(params, name)}")
    check_sampling(params)
    check_grpo_variants(params)
    check_synced_reference(params)
    if params.loss_type == "sapo" and params.delta is not None:
        raise ConfigError(
            "delta caps the clipped loss's ratio; loss_type sapo gates it softly instead: leave delta out"
        )
    if params.loss_type in ("cispo", "vespo") and params.delta is not None:
        raise ConfigError(
            f"delta caps the clipped loss's ratio; loss_type {params.loss_type} has no such ratio: leave delta out"
        )
    upper = 1 + (params.epsilon_high if params.epsilon_high is not None else params.epsilon)
    if params.delta is not None and not upper < params.delta < math.inf:
        raise ConfigError(
            f"delta caps the ratio where the clipped loss does not: it must be above 1 + epsilon_high ({upper:g}), "
            f"got {params.delta}"
        )


def check_tools(params: Params) -> None:
    """tools: file.py:function or package.module.function names (a YAML list too); max_tool_calling_iterations a
    whole number, with tools."""
    if isinstance(params.tools, (list, tuple)):
        params.tools = ",".join(str(name) for name in params.tools)
    if params.tools is not None:
        names = [name.strip() for name in params.tools.split(",") if name.strip()]
        wrong = [name for name in names if not all(name.rpartition(":")[::2]) and not is_dotted(name)]
        if wrong or not names:
            raise ConfigError(
                f"tools: expected file.py:function or package.module.function, comma-separated, got {params.tools!r}"
            )
        params.tools = ",".join(names)
    rounds = params.max_tool_calling_iterations
    if rounds is not None and (isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1):
        raise ConfigError(f"max_tool_calling_iterations must be a whole number, 1 or more, got {rounds!r}")
    if params.tools and "min_new_tokens" in (params.generation_kwargs or {}):
        raise ConfigError(
            "generation_kwargs: min_new_tokens with tools would hold each stretch of writing between tool calls to "
            "it (each is a generate call of its own): leave it out"
        )
    if rounds is not None and not params.tools:
        raise ConfigError("max_tool_calling_iterations is read with tools only: leave it out, or give tools")


def check_preference(params: Params) -> None:
    if isinstance(params.dpo_loss_type, (list, tuple)):  # a YAML list
        params.dpo_loss_type = ",".join(str(kind) for kind in params.dpo_loss_type)
    if isinstance(params.dpo_loss_weights, (list, tuple)):
        params.dpo_loss_weights = ",".join(str(weight) for weight in params.dpo_loss_weights)
    unknown = [kind for kind in params.dpo_loss_types if kind not in DPO_LOSS_TYPES]
    if unknown or not params.dpo_loss_types:
        raise ConfigError(f"dpo_loss_type: {params.dpo_loss_type!r}: use one or more of {', '.join(DPO_LOSS_TYPES)}")
    if params.dpo_loss_weights is not None:
        try:
            weights = params.dpo_loss_weight_values
        except ValueError:
            raise ConfigError(
                f"dpo_loss_weights: {params.dpo_loss_weights!r} is not comma-separated numbers"
            ) from None
        if len(weights) != len(params.dpo_loss_types):
            raise ConfigError(
                f"dpo_loss_weights has {len(weights)} weight(s) for {len(params.dpo_loss_types)} dpo_loss_type(s)"
            )
    if not 0 <= params.label_smoothing < 0.5:
        raise ConfigError(f"label_smoothing must be in [0, 0.5), got {params.label_smoothing}")
    smoothed = [kind for kind in params.dpo_loss_types if kind in DPO_SMOOTHED_LOSSES]
    dpo_losses = params.trainer in ("dpo", "online_dpo")
    if params.label_smoothing and not (params.trainer == "simpo" or (dpo_losses and smoothed)):
        raise ConfigError(
            f"label_smoothing is read by the dpo losses {', '.join(DPO_SMOOTHED_LOSSES)} (dpo_loss_type; dpo, "
            "online_dpo) and by simpo only"
        )
    if params.precompute_ref_log_probs and params.trainer != "dpo":
        raise ConfigError(
            "precompute_ref_log_probs is for trainer dpo (kto's KL estimate pairs the answers of each batch, "
            "which change every epoch; online_dpo's answers are sampled as it trains; the other methods have no "
            "reference)"
        )
    sampled = REGISTRY[params.trainer].data == "prompts"  # grpo, rloo: a reference only for their KL term
    if params.model_ref and not uses_reference(params):
        why = f"{params.trainer} with beta 0 has no KL term" if sampled else f"{params.trainer} has none"
        raise ConfigError(
            f"model_ref names a reference model, read by dpo, kto, online_dpo, grpo and rloo (beta > 0); {why}: "
            "leave it out"
        )
    reference_is_base = params.peft and not params.model_ref and uses_reference(params)
    if reference_is_base and params.init_lora_weights in ("pissa", "olora"):
        raise ConfigError(
            f"{params.trainer} with init_lora_weights={params.init_lora_weights}: the base with the adapter off is "
            "the residual, not the starting model, so it cannot be the reference; give model_ref, or use the "
            "default init"
        )
    if params.cpo_alpha < 0:
        raise ConfigError(f"cpo_alpha must be 0 or positive, got {params.cpo_alpha}")


def check_reward(params: Params) -> None:
    coefficient = params.center_rewards_coefficient
    if coefficient is not None and not 0 <= coefficient < math.inf:
        raise ConfigError(f"center_rewards_coefficient must be 0 or positive, got {coefficient}")


def check_kto(params: Params) -> None:
    if params.kto_beta <= 0:
        raise ConfigError(f"kto_beta must be positive, got {params.kto_beta}")
    for name in ("desirable_weight", "undesirable_weight"):
        if getattr(params, name) is not None and getattr(params, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(params, name)}")
    if params.batch_size < 2 and params.kto_loss_type == "kto":
        raise ConfigError(
            "kto estimates its KL term from the other answers of a micro-batch: batch_size must be at least 2, "
            f"got {params.batch_size}"
        )


def check_distill(params: Params) -> None:
    if not params.teacher_model:
        raise ConfigError("trainer distill needs teacher_model: the model whose answers' distributions it learns")
    if not 0 <= params.distill_beta <= 1:
        raise ConfigError(f"distill_beta must be in [0, 1] (0 forward KL, 1 reverse KL), got {params.distill_beta}")
    if not 0 < params.distill_temperature < math.inf:
        raise ConfigError(f"distill_temperature must be positive, got {params.distill_temperature}")
    if not 0 <= params.distill_ce_weight < math.inf:
        raise ConfigError(f"distill_ce_weight must be 0 or more, got {params.distill_ce_weight}")
    if not 0 <= params.distill_lmbda <= 1:
        raise ConfigError(f"distill_lmbda is a share of micro-batches, in [0, 1], got {params.distill_lmbda}")
    if params.distill_lmbda or params.distill_seq_kd:
        which = "distill_lmbda" if params.distill_lmbda else "distill_seq_kd"
        if params.packing:
            raise ConfigError(
                f"{which} writes each row's answer anew from its prompt: with packing a row holds several examples; "
                "leave packing off"
            )
        if not params.completion_only_loss:
            raise ConfigError(
                f"{which} writes each row's answer anew from its prompt, which completion_only_loss: false leaves "
                "unmarked (the whole row is trained); leave completion_only_loss on"
            )
        if params.distributed_backend == "fsdp":
            raise ConfigError(
                f"{which} with distributed_backend fsdp: sampling answers from sharded weights needs every process "
                "to generate in step with the others, which tunelab does not arrange; use ddp"
            )
    if params.distill_lmbda and params.distill_ce_weight:
        raise ConfigError(
            "distill_ce_weight with distill_lmbda: the cross-entropy would train the model on its own samples; use "
            "one or the other (with distill_seq_kd alone it trains on the teacher's answers, sequence-level KD)"
        )
    if params.distributed_backend == "deepspeed":
        raise ConfigError(
            "trainer distill with distributed_backend deepspeed: ZeRO would shard the teacher as it loads and "
            "nothing gathers it again; use ddp, or fsdp"
        )
    if listed_tokens(params):
        raise ConfigError(
            "add_tokens with trainer distill: the teacher has no rows for tokens the run adds, so there is no "
            "distribution to learn at them; add the tokens to the teacher first, or leave them out"
        )


def _number(params: Params, name: str, low: float = -math.inf, *, above: bool = False) -> float:
    """The setting's value, refused unless a finite number at least `low` (above it, with `above`)."""
    value = getattr(params, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if value < low or (above and value == low):
        raise ConfigError(f"{name} must be {'above' if above else 'at least'} {low:g}, got {value:g}")
    return value


def check_sampling(params: Params) -> None:
    """The sampling switches beyond temperature and top_p (grpo, rloo), as generate reads them."""
    if isinstance(params.top_k, bool) or not isinstance(params.top_k, int) or params.top_k < 0:
        raise ConfigError(f"top_k must be a whole number, 0 (off) or more, got {params.top_k!r}")
    if params.min_p is not None and not 0 <= _number(params, "min_p") <= 1:
        raise ConfigError(f"min_p must be in [0, 1], got {params.min_p}")
    _number(params, "repetition_penalty", 0.0, above=True)


def check_grpo_variants(params: Params) -> None:
    """grpo's variants around the loss: VESPO's weights, GDPO's aggregation, the entropy mask and bonus, the
    off-policy mask. A setting its variant is off for would do nothing: refused."""
    unclipped = {"sapo": ("epsilon", "epsilon_high"), "vespo": ("epsilon", "epsilon_high"), "cispo": ("epsilon",)}
    for name in unclipped.get(params.loss_type, ()):
        if _given(params, name):
            raise ConfigError(f"{name} is a clip range, and loss_type {params.loss_type} clips no ratio: leave it out")
    if params.loss_type != "vespo":
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
            if _given(params, name):
                raise ConfigError(f"{name} is read by loss_type vespo only: leave it out, or use that loss")
    for name in ("vespo_k_pos", "vespo_k_neg"):
        _number(params, name, 0.0)
    for name in ("vespo_lambda_pos", "vespo_lambda_neg"):
        _number(params, name, 0.0, above=True)
    if params.multi_objective_aggregation == "normalize_then_sum" and _given(params, "scale_rewards"):
        raise ConfigError(
            "scale_rewards with multi_objective_aggregation normalize_then_sum: each reward is normalised within its "
            "group and the sum over the whole step, whatever scale_rewards says; leave it out"
        )
    if not 0 <= _number(params, "top_entropy_quantile") <= 1:
        share = params.top_entropy_quantile
        raise ConfigError(f"top_entropy_quantile must be in [0, 1] (a share of the tokens), got {share}")
    _number(params, "entropy_coef")
    adaptive = ("entropy_coef_min", "entropy_coef_max", "entropy_coef_delta", "entropy_target")
    if not params.use_adaptive_entropy:
        for name in adaptive:
            if _given(params, name):
                raise ConfigError(f"{name} is read with use_adaptive_entropy only: leave it out, or turn it on")
    else:
        low, high = _number(params, "entropy_coef_min"), _number(params, "entropy_coef_max")
        _number(params, "entropy_coef_delta", 0.0, above=True)
        _number(params, "entropy_target", 0.0)
        if not low <= params.entropy_coef <= high:
            raise ConfigError(
                f"use_adaptive_entropy starts from entropy_coef ({params.entropy_coef:g}), which must lie between "
                f"entropy_coef_min ({low:g}) and entropy_coef_max ({high:g})"
            )
    if params.off_policy_mask_threshold is not None:
        _number(params, "off_policy_mask_threshold", 0.0, above=True)
        if params.num_iterations == 1 and params.steps_sampled_together == 1:
            raise ConfigError(
                "off_policy_mask_threshold masks completions the policy has moved away from since it sampled them; "
                "with num_iterations 1 and a sampling per step each batch is trained once, right after sampling, so "
                "it never has: raise num_iterations or steps_per_generation, or leave it out"
            )
