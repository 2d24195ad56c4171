"""The training methods tunelab knows: the one list. The CLI, the config checks, the app and the docs read it.

A method is one module in this package defining `METHOD` plus one line in `REGISTRY`, which says what data the
method trains on ("examples": text, chats, instructions; "pairs": prompt/chosen/rejected; "labeled": a prompt,
an answer and whether it is desirable; "prompts": prompts to generate from) and summarises it.
Modules are imported only when their method is used: the preference methods subclass transformers' Trainer,
and `tunelab --help` should not pay seconds of imports for them.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from tunelab.methods.base import Method, RowStats


@dataclass(frozen=True)
class Entry:
    """One registry line: the method's module in this package, its data kind, its summary for --help and docs."""

    module: str
    # "examples" (data/__init__.load_data), "pairs" (data/preference.py, with the length rules), "labeled"
    # (data/kto.py, the same rules) or "prompts"
    # (data/prompts.py: a prompt and the columns the rewards read)
    data: str
    summary: str
    reference: bool = False  # compared with a reference model (model_ref, or the base with the adapter off)
    # The settings (LLMParams fields) it reads that other methods read too (dpo_beta: dpo, orpo and simpo).
    params: tuple[str, ...] = ()
    # The settings only it reads (or only it and the other methods listing the same name): given to any other
    # trainer, they are refused (config/method_checks.check_own_settings), not silently ignored.
    own: tuple[str, ...] = ()
    # The parameters its data reader reads (LLMParams fields): part of the prepared-data cache's key
    # (data/cache.py), so that a run with other values never reuses data prepared with these.
    data_params: tuple[str, ...] = ()

    @property
    def settings(self) -> tuple[str, ...]:
        """The method's settings, shared then own: its app form shows them, evaluate reads them from the run."""
        return self.params + self.own


# What the pair readers read (data/preference.py; kto's data/kto.py too): the rejected answer's column, and the
# lengths prompts and answers are cut to.
PAIR_DATA = ("rejected_text_column", "max_prompt_length", "max_completion_length")

# What every method that samples from prompts (grpo, rloo, online_dpo) alone reads: the rewards and the sampling.
# The answer_* rewards' column is checked when the prompts are read (data/prompts.py): a cached entry must not let
# a run with other rewards skip that check.
SAMPLING = (
    "reward_functions",
    "reward_weights",
    "reward_answer_column",
    "reward_regex",
    "reward_json_schema",
    "prompts_per_generation",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "generation_kwargs",
    "completions_every",
    "tools",
    "max_tool_calling_iterations",
)
# ...and what the policy-gradient ones (grpo, rloo) read besides: the group, the KL weight and the clipping.
SAMPLED = (
    *SAMPLING,
    "num_generations",
    "num_generations_eval",
    "beta",
    "epsilon",
    "epsilon_high",
    "num_iterations",
    "steps_per_generation",
    "mask_truncated_completions",
)
# TR-DPO's moving reference: dpo's, grpo's and rloo's (TRL's sync_ref_model).
SYNCED = ("sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps")
# (tools: the prompts are rendered with their schemas)
PROMPT_DATA = ("max_prompt_length", "reward_functions", "reward_answer_column", "tools")
# dpo's loss, which online_dpo trains its sampled pairs with too (methods/dpo.DPOLoss).
DPO_LOSS = ("dpo_loss_type", "dpo_loss_weights", "discopop_tau", "f_divergence_type", "f_alpha_divergence_coef")
# A mixture of experts' load-balancing loss, added by every method that trains a causal LM's own loss (TRL's
# SFT, DPO, KTO, GRPO and RLOO trainers do); not reward (a classifier head) nor distill (the teacher's loss).
ROUTED = "router_aux_loss_coef"

REGISTRY: dict[str, Entry] = {
    "default": Entry(
        "clm",
        "examples",
        "causal LM over the whole text, joined and cut into blocks of block_size",
        params=("neftune_noise_alpha",),
        own=(ROUTED,),
    ),
    "sft": Entry(
        "sft",
        "examples",
        "supervised fine-tuning per example (optionally packed), loss on answer tokens",
        params=("neftune_noise_alpha",),
        own=(ROUTED,),
    ),
    "reward": Entry(
        "reward",
        "pairs",
        "reward model (sequence classifier, one score) trained on chosen/rejected pairs",
        own=("margin_column", "center_rewards_coefficient"),
        data_params=(*PAIR_DATA, "margin_column"),
    ),
    "dpo": Entry(
        "dpo",
        "pairs",
        "direct preference optimization on prompt/chosen/rejected pairs (dpo_loss_type, dpo_beta)",
        reference=True,
        params=("dpo_beta", "label_smoothing", "precompute_ref_log_probs"),
        own=(
            *DPO_LOSS,
            "ld_alpha",
            "use_weighting",
            *SYNCED,
            ROUTED,
        ),
        data_params=PAIR_DATA,
    ),
    "orpo": Entry(
        "orpo",
        "pairs",
        "odds ratio preference optimization on prompt/chosen/rejected pairs (no reference model)",
        params=("dpo_beta",),
        own=(ROUTED,),
        data_params=PAIR_DATA,
    ),
    "kto": Entry(
        "kto",
        "labeled",
        "Kahneman-Tversky optimization: single answers marked desirable or not (kto_beta)",
        reference=True,
        own=("kto_beta", "kto_loss_type", "label_column", "desirable_weight", "undesirable_weight", ROUTED),
        # the class weights: stated with the rows (methods/kto.build_kto_rows), which the cache keeps
        data_params=("label_column", *PAIR_DATA, "desirable_weight", "undesirable_weight"),
    ),
    "simpo": Entry(
        "simpo",
        "pairs",
        "simple preference optimization: length-normalized margin, no reference model (simpo_gamma)",
        params=("dpo_beta", "label_smoothing"),
        own=("simpo_gamma", "cpo_alpha", ROUTED),
        data_params=PAIR_DATA,
    ),
    "distill": Entry(
        "distill",
        "examples",
        "knowledge distillation: the teacher's next-token distributions on the answers (teacher_model)",
        own=(
            "teacher_model",
            "distill_beta",
            "distill_temperature",
            "distill_ce_weight",
            "distill_lmbda",
            "distill_seq_kd",
        ),
    ),
    "grpo": Entry(
        "grpo",
        "prompts",
        "group relative policy optimization: sampled completions scored by reward functions",
        params=("max_completion_length",),
        own=(
            *SAMPLED,
            "loss_type",
            "importance_sampling_level",
            "scale_rewards",
            "use_bias_correction_kl",
            "delta",
            "sapo_temperature_pos",
            "sapo_temperature_neg",
            "vespo_k_pos",
            "vespo_lambda_pos",
            "vespo_k_neg",
            "vespo_lambda_neg",
            "multi_objective_aggregation",
            "top_entropy_quantile",
            "entropy_coef",
            "use_adaptive_entropy",
            "entropy_coef_min",
            "entropy_coef_max",
            "entropy_coef_delta",
            "entropy_target",
            "off_policy_mask_threshold",
            *SYNCED,
            ROUTED,
        ),
        data_params=PROMPT_DATA,
    ),
    "rloo": Entry(
        "rloo",
        "prompts",
        "REINFORCE leave-one-out: sampled completions scored by reward functions, each against its group's others",
        params=("max_completion_length",),
        own=(*SAMPLED, "normalize_advantages", "reward_clip_range", *SYNCED, ROUTED),
        data_params=PROMPT_DATA,
    ),
    "online_dpo": Entry(
        "online_dpo",
        "prompts",
        "online DPO: two completions sampled per prompt, the rewards pick the chosen one, dpo's loss on the pair",
        reference=True,
        params=("dpo_beta", "label_smoothing", "max_completion_length"),
        own=(*SAMPLING, *DPO_LOSS, "missing_eos_penalty", "keep_tied_pairs", ROUTED),
        data_params=PROMPT_DATA,
    ),
}


def readers() -> dict[str, tuple[str, ...]]:
    """Each method's own setting and the methods that read it: any other trainer is refused it."""
    found: dict[str, tuple[str, ...]] = {}
    for name, entry in REGISTRY.items():
        for setting in entry.own:
            found[setting] = (*found.get(setting, ()), name)
    return found


def uses_reference(params: object) -> bool:
    """Whether a run compares with a reference model (model_ref, or the base with the adapter off, or a frozen
    copy): its method says so, or it samples (grpo, rloo) with a KL term (beta > 0)."""
    entry = REGISTRY.get(getattr(params, "trainer", ""))
    sampled_kl = entry is not None and entry.data == "prompts" and getattr(params, "beta", 0.0) > 0
    return bool(entry and (entry.reference or sampled_kl))


# The losses `dpo_loss_type` offers, TRL's (methods/dpo.py computes them); here so the config checks need no torch.
DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)  # fmt: skip
# The losses of the chosen-rejected difference alone: only they have a form for another f-divergence (the others'
# rewards would keep a term of the prompt that only the difference cancels), TRL's rule.
DPO_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
DPO_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The losses that read label_smoothing (as the share of flipped preferences, or EXO's target share).
DPO_SMOOTHED_LOSSES = ("robust", "exo_pair", "aot", "aot_unpaired")


class _Methods(Mapping[str, Method]):
    """`METHODS[name]` imports the method's module on first use; its name and data kind come from REGISTRY."""

    def __getitem__(self, name: str) -> Method:
        entry = REGISTRY[name]
        method = importlib.import_module(f"tunelab.methods.{entry.module}").METHOD
        return dataclasses.replace(method, name=name, data=entry.data)

    def __iter__(self) -> Iterator[str]:
        return iter(REGISTRY)

    def __len__(self) -> int:
        return len(REGISTRY)


METHODS: Mapping[str, Method] = _Methods()
SUMMARIES: dict[str, str] = {name: entry.summary for name, entry in REGISTRY.items()}

__all__ = [
    "DPO_DIVERGENCES",
    "DPO_DIVERGENCE_LOSSES",
    "DPO_LOSS_TYPES",
    "DPO_SMOOTHED_LOSSES",
    "METHODS",
    "REGISTRY",
    "SUMMARIES",
    "Entry",
    "Method",
    "RowStats",
]
