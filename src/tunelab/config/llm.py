"""The parameter object of an LLM fine-tuning run: tunelab's counterpart of AutoTrain's `LLMTrainingParams`.

Every field is described and defaulted once, here. The CLI flags (`cli.py`), the AutoTrain YAML translator
(`config/autotrain.py`), the Python API and `docs/config.md` are all derived from this dataclass.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from tunelab.config.base import (
    BAD_ROWS_HELP,
    DEFAULT_MODEL,
    FREEZE_SETTINGS,
    LAUNCH,
    LORA_VARIANTS,
    RESUME_HELP,
    SAVE_STEPS_HELP,
    Params,
    check_choices,
    check_freezing,
    check_launch,
    check_positive,
    check_save_steps,
    check_training,
    check_valid_size,
    listed_tokens,
    param,
)
from tunelab.config.method_checks import (
    check_distill,
    check_dpo,
    check_kto,
    check_own_settings,
    check_preference,
    check_reward,
    check_sampled,
)
from tunelab.config.rope import read_rope_scaling
from tunelab.errors import ConfigError
from tunelab.methods import DPO_DIVERGENCES, DPO_LOSS_TYPES, REGISTRY
from tunelab.user_code import function_specs

CHAT_TEMPLATES = ("none", "zephyr", "chatml", "tokenizer", "alpaca")


def run_template(saved: str | None) -> str | None:
    """The chat_template that reads data as a finished run read it: its setting as saved, except the user's own
    template (a file's path, relative to where training ran and perhaps edited since), which the run folder's
    tokenizer carries as it was trained with."""
    return "tokenizer" if saved is not None and saved not in CHAT_TEMPLATES else saved


# Not a template variable to set, in training's chat_template_kwargs or a served request's: apply_chat_template's
# own arguments, the names templates are rendered with, and Jinja's own words, which no variable can be named.
RENDER_NAMES = {"messages", "conversation", "tools", "documents", "add_generation_prompt", "continue_final_message"}
RENDER_NAMES |= {"tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict"}
RENDER_NAMES |= {"tokenizer_kwargs", "return_assistant_tokens_mask", "chat_template", "raise_exception"}
RENDER_NAMES |= {"bos_token", "eos_token", "pad_token", "unk_token"}
RENDER_NAMES |= {"true", "false", "none", "True", "False", "None", "not", "and", "or", "in", "is", "if", "else"}


def template_variables(value: str | dict | None) -> dict | None:
    """chat_template_kwargs as a dict of template variables (a JSON object on the command line), None when unset;
    ConfigError for anything that is not an object of true/false, numbers or text under variable names."""
    if value is None or value == "" or value == {}:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ConfigError(f"chat_template_kwargs: not a JSON object ({err.msg}): {value!r}") from None
    example = 'e.g. {"enable_thinking": false}'
    if not isinstance(value, dict) or not all(isinstance(key, str) and key.isidentifier() for key in value):
        raise ConfigError(f"chat_template_kwargs must be an object of template variables ({example})")
    for key, item in value.items():
        if key in RENDER_NAMES:
            raise ConfigError(f"chat_template_kwargs: {key} is not a template variable to set (the renderer sets it)")
        finite = not isinstance(item, float) or math.isfinite(item)
        if not isinstance(item, (bool, int, float, str)) or not finite:
            raise ConfigError(f"chat_template_kwargs: {key} must be true/false, a finite number or text ({example})")
    return dict(value) or None


ROPE_SCALINGS = ("linear", "yarn")  # both trained through and written to GGUF (models/positions.py)
# What the input embeddings and output heads of transformers' causal LMs are called.
EMBEDDING_MODULES = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out", "word_embeddings")


def token_list(value: list | str | None, name: str) -> list[str] | None:
    """add_tokens / add_special_tokens as a list of tokens (comma-separated text, or a list), None when unset."""
    if value is None or value == "" or value == []:
        return None
    tokens = value.split(",") if isinstance(value, str) else value
    if not isinstance(tokens, (list, tuple)) or not all(isinstance(token, str) for token in tokens):
        raise ConfigError(f"{name} must be tokens, comma-separated or a list of texts, got {value!r}")
    tokens = [token.strip() for token in tokens]
    if not all(tokens):
        raise ConfigError(f"{name}: an empty token in {value!r}")
    return list(dict.fromkeys(tokens))


def custom_chat_template(value: str | None) -> str | None:
    """The Jinja of a chat_template that is not one of CHAT_TEMPLATES: the template itself when it holds Jinja
    (`{{` or `{%`: Axolotl's chat_template_jinja, written inline in a config file), else the text of the file it
    names (TRL's chat_template_path). None for a template name or unset; ConfigError for anything else."""
    if value is None or value in CHAT_TEMPLATES:
        return None
    if "{{" in value or "{%" in value:
        return value
    path = Path(os.path.expanduser(value))
    if path.suffix != ".jinja" and not path.is_file():
        raise ConfigError(
            f"chat_template: {value!r} is not one of {', '.join(CHAT_TEMPLATES)}, nor the path of a .jinja file or a "
            "Jinja template"
        )
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        why = err.strerror if isinstance(err, OSError) and err.strerror else "not UTF-8 text"
        raise ConfigError(f"chat_template: cannot read the template file {path}: {why}") from None


@dataclass
class LLMParams(Params):
    """Everything that defines an LLM fine-tuning run. Names follow AutoTrain Advanced's `LLMTrainingParams`."""

    task: ClassVar[str] = "llm"

    # --- what to train, on what, where to put it
    model: str = param(DEFAULT_MODEL, "Base model: a Hugging Face hub id, a local model folder, or a .gguf file.")
    project_name: str = param(
        "project-name", "Output folder of the run (created when the run completes; must not exist yet)."
    )
    data_path: str | list = param(
        "data",
        "Data: a CSV/JSONL/JSON/Parquet file, a folder holding <train_split>.<ext>, or a hub dataset id; in a "
        "config file also a list of such sources, each with its own split, columns, template and fraction or "
        "weight (a mixture, docs/data.md).",
    )
    train_split: str = param(
        "train", "Name of the training split (the file stem inside a data folder; a hub dataset's subset:split)."
    )
    valid_split: str | None = param(None, "Name of the validation split; none means no evaluation.")
    valid_size: float | None = param(
        None,
        "For data without a validation split: hold out this share of the train split's examples (0 < x < 1), or "
        "this many (a whole number), drawn at random with `seed`, and evaluate on them.",
    )
    trainer: str = param(
        "default",
        "Training method: `default` (causal LM over text cut into blocks), `sft` (per example, loss on the "
        "answer), `reward` (reward model), `dpo`, `orpo` or `simpo` (preference pairs), `kto` (answers marked "
        "good or bad), `distill` (a teacher's distributions), `grpo` or `rloo` (rewards from functions), "
        "`online_dpo` (pairs sampled and ranked by those rewards). The list is tunelab.methods.METHODS.",
    )

    # --- data shape
    text_column: str = param("text", "Column with the text, the message list, or (preference data) the chosen answer.")
    prompt_text_column: str | None = param(
        None, "Column with the prompt, for prompt/completion data (the completion is in text_column)."
    )
    rejected_text_column: str | None = param(None, "Column with the rejected answer (preference trainers).")
    image_column: str | None = param(
        None,
        "sft on a vision-language model: the column holding each row's image (a path, data: URI or bytes, or a list "
        "of them), shown in the user turn before the prompt; a row of text_column alone becomes an image and its "
        "caption (AutoTrain's vlm tasks: `tunelab vlm`). Chats name their images in their messages (docs/data.md). "
        "dpo, orpo, simpo, grpo: the column listing the images of each prompt (default: `images` or `image`).",
    )
    image_max_pixels: int | None = param(
        None,
        "Vision-language models whose images take tokens by their pixel count (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): the "
        "most pixels an image keeps (it is scaled down to fit; Qwen2-VL writes a token per 28x28 pixels), "
        "LLaMA-Factory's name. Set on the model's image processor and saved with the run, so generate and serve "
        "see images as training did. Unset: the processor's own (Qwen2-VL's allows thousands of tokens an image).",
    )
    image_min_pixels: int | None = param(
        None,
        "The fewest pixels an image keeps (scaled up to reach them), as image_max_pixels; unset: the processor's.",
    )
    label_column: str = param("label", "kto: column saying whether the answer is desirable (true/false, 1/0, yes/no).")
    chat_template: str | None = param(
        None,
        "How rows become text: none (text used as is), zephyr, chatml, tokenizer (the model's own template), "
        "alpaca (the Alpaca instruction prompt), or your own Jinja chat template: a .jinja file's path, or the "
        "template itself. Unset: picked from the data (see docs/data.md).",
        (None, *CHAT_TEMPLATES),
        open_choices=True,
    )
    chat_template_kwargs: dict | str | None = param(
        None,
        "Variables for the chat template, as TRL's and vLLM's chat_template_kwargs: Qwen3's or SmolLM3's "
        "enable_thinking: false, say (a JSON object on the command line). The data is rendered with them, and the "
        "run's saved template keeps them as its defaults, so chat, generate and serve write prompts the same way "
        "(a served request's own chat_template_kwargs still override them).",
    )
    add_tokens: list | str | None = param(
        None,
        "New tokens for the tokenizer, comma-separated or a list (Axolotl's tokens): each becomes one token, with "
        "rows in the model's embeddings and output head that the run trains (with LoRA, beside the adapter). A "
        "listed token the tokenizer has already keeps its id, and its rows are trained too.",
    )
    add_special_tokens: list | str | None = param(
        None,
        "As add_tokens, added as special tokens (LLaMA-Factory's add_special_tokens): never split, and left out of "
        "decoded answers, as chat-template markers are.",
    )
    add_eos_token: bool = param(True, "Append the end-of-sequence token to each text (plain-text rows).")
    completion_only_loss: bool = param(
        True, "sft: train only on assistant/completion tokens of chat and prompt/completion rows."
    )
    mask_history: bool = param(
        False,
        "Chat rows: the loss on the last assistant answer of each conversation only, the earlier turns being its "
        "context (LLaMA-Factory's mask_history). Default: on every answer.",
    )
    bad_rows: str = param("error", BAD_ROWS_HELP, ("error", "skip"))
    packing: bool = param(False, "sft: pack several examples into each block_size row (attention kept per example).")
    cache_dir: str | None = param(
        None,
        "Folder of the prepared-data cache (default $TUNELAB_DATA_CACHE, else ~/.cache/tunelab/data); see "
        "docs/data.md for what its key holds. Entries may be deleted at any time.",
    )
    no_cache: bool = param(False, "Prepare the data afresh and keep nothing in the prepared-data cache.")
    streaming: bool = param(
        False,
        "default/sft: prepare the data block by block as training reads it instead of all before (very large "
        "data; needs max_steps; rows in file order, bad rows found as their block is read).",
    )
    dataset_num_proc: int | None = param(
        None, "Processes that prepare the data (unset: one per core, up to 8, for data files over 8 MB)."
    )
    group_by_length: bool = param(
        True, "Without packing: batch examples (or preference pairs) of similar length together (less padding)."
    )

    # --- lengths
    block_size: int = param(1024, "Tokens per training row; longer examples are truncated (and counted). -1: auto.")
    model_max_length: int = param(2048, "Longest sequence the model is asked to handle.")
    rope_scaling: dict | str | None = param(
        None,
        "Train rows longer than the model's positions by stretching its rotary positions: linear (position "
        "interpolation) or yarn (LLaMA-Factory's rope_scaling; Axolotl's {type, factor} is read too). The factor "
        "is block_size / max_position_embeddings rounded up, unless rope_scaling_factor gives it. The trained model "
        "keeps the stretch: generate, serve, merge and the GGUF export (merged; not gguf-lora) read it.",
        (None, *ROPE_SCALINGS),
    )
    rope_scaling_factor: float | None = param(
        None, "With rope_scaling: how many times the model's positions to stretch (above 1; default: see above)."
    )
    max_prompt_length: int = param(
        128,
        "Preference trainers, grpo, rloo and online_dpo: longest prompt kept (truncated from the left; with tools, "
        "a longer prompt is a bad row: its beginning holds the tools' schemas).",
    )
    max_completion_length: int | None = param(
        None,
        "Preference trainers: longest completion kept; grpo, rloo, online_dpo, and distill's sampled answers "
        "(distill_lmbda, distill_seq_kd): tokens generated per completion (default 256).",
    )
    padding: str = param(
        "right",
        "Accepted for AutoTrain compatibility: tunelab pads training batches on the right whatever it says (padding "
        "is masked out of attention and loss, and right padding keeps every row's positions from 0).",
        ("left", "right"),
    )

    # --- optimisation
    lr: float = param(3e-5, "Peak learning rate.")
    epochs: int = param(1, "Passes over the training data.")
    max_steps: int = param(-1, "Stop after this many optimizer steps (-1: run all epochs).")
    batch_size: int = param(2, "Examples (rows) per device per step.")
    gradient_accumulation: int = param(4, "Micro-batches accumulated per optimizer step.")
    auto_find_batch_size: bool = param(False, "Halve the batch size on out-of-memory until it fits.")
    warmup_ratio: float = param(0.1, "Fraction of steps spent warming the learning rate up.")
    optimizer: str = param("adamw_torch", "Optimizer, any transformers `optim` name (e.g. adamw_torch, adamw_8bit).")
    scheduler: str = param("linear", "Learning-rate schedule (linear, cosine, constant, ...).")
    weight_decay: float = param(0.0, "Weight decay.")
    max_grad_norm: float = param(1.0, "Gradient clipping norm.")
    seed: int = param(42, "Random seed (data order, initialisation, dropout).")
    mixed_precision: str | None = param(
        None,
        "fp16 (CUDA only) or bf16 (a GPU, or a CPU with bf16 instructions: AVX512-BF16 or AMX, where it is about"
        " 1.5x float32's speed); none trains in the model's float32.",
        (None, "no", "fp16", "bf16"),
    )
    gradient_checkpointing: str = param(
        "auto",
        "Recompute activations in the backward pass instead of keeping them. auto: checkpoint only as many decoder"
        " layers as the device's free memory requires, from the memory estimate (none when the run fits without;"
        " the log and the dry run say what was chosen and why); on: every checkpoint_every-th layer; off: none"
        " (true and false are read as on and off).",
        ("auto", "on", "off"),
    )
    disable_gradient_checkpointing: bool = param(
        False, "AutoTrain's switch: true turns gradient checkpointing off (gradient_checkpointing off)."
    )
    checkpoint_every: int = param(
        1,
        "With gradient_checkpointing on, checkpoint only every Nth decoder layer: 1 checkpoints all (least memory);"
        " 2, 3, ... keep the other layers' activations (less recomputation, more memory).",
    )
    fast_loss: bool = param(
        True, "Compute the loss from hidden states at the answer positions, in chunks (no full logits)."
    )
    torch_compile: bool = param(False, "Compile each decoder layer with torch.compile (pays off on GPUs).")
    fused_ops: bool = param(
        True,
        "Memory-lean RMSNorm, SwiGLU and LoRA dropout (Llama-family models): same maths, fewer saved activations;"
        " under LoRA the norms' and SwiGLU's outputs are rebuilt in the backward pass instead of kept, and each LoRA"
        " product is added inside its matrix multiply.",
    )
    router_aux_loss_coef: float | None = param(
        None,
        "Mixture-of-experts models (every method but reward and distill): weight of the router's load-balancing "
        "loss (over the trained forward's real tokens, padding left out), added to the training loss so that the "
        "experts stay evenly used (TRL's; default: the model's own, 0.001 for Mixtral and Qwen3-MoE; 0: off; "
        "eval_loss never has it). Refused for a model without such a loss.",
    )
    neftune_noise_alpha: float | None = param(
        None,
        "default and sft: NEFTune, uniform noise added to the input embeddings while training, of size "
        "alpha / sqrt(tokens x hidden size), tokens being the row's (a packed row's: block_size, as in TRL) (the "
        "paper's 5 is a common choice). Unset: none.",
    )

    # --- PEFT / quantization
    peft: bool = param(False, "Train a LoRA adapter instead of all weights.")
    lora_r: int = param(16, "LoRA rank.")
    lora_alpha: int = param(32, "LoRA alpha (scale = alpha / r).")
    lora_dropout: float = param(0.05, "LoRA dropout.")
    target_modules: str | None = param(
        "all-linear", "Modules LoRA adapts: all-linear, or comma-separated names (q_proj,v_proj)."
    )
    use_dora: bool = param(*LORA_VARIANTS["use_dora"])
    use_rslora: bool = param(*LORA_VARIANTS["use_rslora"])
    init_lora_weights: str = param(*LORA_VARIANTS["init_lora_weights"])
    loraplus_lr_ratio: float | None = param(*LORA_VARIANTS["loraplus_lr_ratio"])
    lora_rank_pattern: str | None = param(*LORA_VARIANTS["lora_rank_pattern"])
    lora_alpha_pattern: str | None = param(*LORA_VARIANTS["lora_alpha_pattern"])
    modules_to_save: str | None = param(*LORA_VARIANTS["modules_to_save"])
    quantization: str | None = param(
        None, "Load the base model in int4 or int8 (QLoRA; needs peft and CUDA).", (None, "int4", "int8")
    )

    # --- freeze training: full fine-tuning of some of the weights (models/freeze.py)
    freeze_trainable_layers: int | None = param(*FREEZE_SETTINGS["freeze_trainable_layers"])
    freeze_trainable_modules: str = param(*FREEZE_SETTINGS["freeze_trainable_modules"])
    freeze_extra_modules: str | None = param(*FREEZE_SETTINGS["freeze_extra_modules"])
    unfrozen_parameters: list | str | None = param(*FREEZE_SETTINGS["unfrozen_parameters"])
    merge_adapter: bool = param(
        False,
        "After LoRA training, also save the adapter merged into a full model (merged/). "
        "Without peft the full model is saved anyway.",
    )

    # --- preference trainers
    model_ref: str | None = param(
        None,
        "dpo, kto, online_dpo, grpo and rloo (beta > 0): reference model (default: the base model with the adapter "
        "off, or a frozen copy without peft).",
    )
    dpo_beta: float = param(
        0.1,
        "dpo, online_dpo: beta (strength of the pull towards the reference); orpo: weight of the odds ratio; simpo: "
        "beta (the reward scale; the SimPO paper uses 2 to 10).",
    )
    dpo_loss_type: str = param(
        "sigmoid",
        f"dpo, online_dpo: the loss: {', '.join(DPO_LOSS_TYPES)} (TRL's; docs/preference.md), or several "
        "comma-separated, added with dpo_loss_weights (TRL's multi-loss form, e.g. sigmoid,sft).",
    )
    precompute_ref_log_probs: bool = param(
        False,
        "dpo: score every pair with the reference once before training (kept with the prepared data), then train "
        "with no reference model in memory.",
    )
    dpo_loss_weights: str | None = param(
        None, "dpo, online_dpo: a weight per dpo_loss_type, comma-separated (default: 1 each)."
    )
    label_smoothing: float = param(
        0.0,
        "dpo and online_dpo (the robust, exo_pair, aot and aot_unpaired losses) and simpo: the assumed share of "
        "flipped preferences, in [0, 0.5).",
    )
    discopop_tau: float = param(
        0.05,
        "dpo, online_dpo (the discopop loss): the temperature of its mix of logistic and exponential losses (the "
        "paper's).",
    )
    f_divergence_type: str = param(
        "reverse_kl",
        "dpo, online_dpo: the divergence from the reference the loss regularises with (f-DPO): reverse_kl is DPO's; "
        "other than it only with the losses of the chosen-rejected difference.",
        choices=DPO_DIVERGENCES,
    )
    f_alpha_divergence_coef: float = param(
        0.5, "dpo, online_dpo (f_divergence_type alpha_divergence): alpha (1 is reverse KL, 0 forward KL)."
    )
    ld_alpha: float | None = param(
        None,
        "dpo: LD-DPO: the weight, in [0, 1], of each answer's tokens past the length of the pair's shorter answer, "
        "so that length alone earns less reward (unset: plain DPO).",
    )
    sync_ref_model: bool = param(
        False,
        "dpo, grpo, rloo (beta > 0): TR-DPO's update: every ref_model_sync_steps steps the reference moves towards "
        "the model being trained (reference = alpha x model + (1 - alpha) x reference), so it is not left far "
        "behind (full fine-tuning).",
    )
    ref_model_mixup_alpha: float = param(0.6, "sync_ref_model: alpha, how far the reference moves each time.")
    ref_model_sync_steps: int = param(512, "sync_ref_model: steps between two moves of the reference.")
    use_weighting: bool = param(
        False,
        "dpo: WPO: weigh each pair by how probable the policy finds both answers (per token, normalised), so that "
        "pairs close to its own outputs count most.",
    )
    margin_column: str | None = param(
        None,
        "reward: the column of each pair's margin, a number saying how much the chosen answer should outscore the "
        "rejected one: the loss becomes -log sigmoid(r_chosen - r_rejected - margin) (Llama 2's; TRL's margin "
        "column). Default: a column named margin, if the data has one.",
    )
    center_rewards_coefficient: float | None = param(
        None,
        "reward: weight of a penalty on the mean squared sum of each pair's two rewards, which keeps the rewards "
        "centred on 0 (TRL's; 0.01 is the usual value; default: none).",
    )
    kto_beta: float = param(0.1, "kto: beta (the reward scale, and the pull towards the reference).")
    kto_loss_type: str = param(
        "kto",
        "kto: the loss: kto (the paper's, with the batch KL estimate), or apo_zero_unpaired (APO-zero on single "
        "answers: desirable ones up, undesirable ones down, against the reference; no KL estimate, no second pass).",
        ("kto", "apo_zero_unpaired"),
    )
    desirable_weight: float | None = param(
        None,
        "kto: weight of the desirable answers' loss (default: 1, or the weights that balance unequal classes, as "
        "the KTO paper and TRL recommend; the log says which).",
    )
    undesirable_weight: float | None = param(None, "kto: weight of the undesirable answers' loss (see above).")
    simpo_gamma: float = param(0.5, "simpo: the target reward margin (gamma).")
    cpo_alpha: float = param(
        0.0, "simpo: weight of an SFT (NLL) term on the chosen answers (0: SimPO as published; 1: CPO-SimPO)."
    )

    # --- distill (methods/distill.py, speed/divergence.py; the loss of TRL's GKDTrainer on the data's answers)
    teacher_model: str | None = param(
        None,
        "distill: the teacher, a causal LM (hub id, folder or .gguf) with the same tokenizer and vocabulary as "
        "model, whose next-token distributions on the data's answers the model learns (TRL's "
        "teacher_model_name_or_path).",
    )
    distill_beta: float = param(
        0.0,
        "distill: which divergence from the teacher, as TRL's GKD beta: 0 forward KL(teacher || model), classic "
        "distillation; 1 reverse KL(model || teacher); between, the generalized Jensen-Shannon divergence.",
    )
    distill_temperature: float = param(
        1.0, "distill: both distributions softened by this temperature before they are compared (above 1: softer)."
    )
    distill_ce_weight: float = param(
        0.0,
        "distill: weight of the usual cross-entropy on the data's own answer tokens, added to the divergence "
        "(0: the teacher alone, as TRL's GKD).",
    )
    distill_lmbda: float = param(
        0.0,
        "distill: the share of micro-batches whose answers the model writes itself, sampled from each row's prompt, "
        "and learns the teacher's distributions at (on-policy distillation, TRL's GKD lmbda; 0: the data's "
        "answers only).",
    )
    distill_seq_kd: bool = param(
        False,
        "distill: the other micro-batches' answers written by the teacher, not read from the data (sequence-level "
        "KD, TRL's GKD seq_kd).",
    )

    # --- grpo, rloo and online_dpo (rewards.py, methods/sampling.py, grpo.py, rloo.py, online_dpo.py; names and
    # defaults as TRL's GRPOConfig unless said)
    reward_functions: str | None = param(
        None,
        "grpo, rloo, online_dpo: rewards, comma-separated: built-ins (answer_tag, answer_hash, answer_boxed, "
        "answer_last_number, format_tag, format_think, format_regex, valid_json, length_penalty), "
        "file.py:function, or a reward model: a folder (a --trainer reward run) or a hub id of a sequence "
        "classifier with one output (docs/grpo.md). Also package.module.function (TRL's form); from Python, "
        "function objects too.",
        functions="reward",
    )
    reward_weights: str | None = param(
        None, "grpo, rloo, online_dpo: a weight per reward, comma-separated (default: 1 each)."
    )
    reward_answer_column: str = param(
        "answer", "grpo, rloo, online_dpo: the column the answer_* rewards compare with."
    )
    reward_regex: str | None = param(None, "grpo, rloo, online_dpo: the pattern format_regex looks for (re.search).")
    reward_json_schema: str | None = param(
        None, "grpo, rloo, online_dpo: a JSON schema file valid_json checks against (jsonschema)."
    )
    num_generations: int = param(
        8, "grpo, rloo: completions sampled per prompt (a group; its rewards are compared; online_dpo: always 2)."
    )
    keep_tied_pairs: bool = param(
        False,
        "online_dpo: train on a prompt's two completions when their rewards tie too, the first as chosen (TRL's "
        "rule); by default a tie makes no pair: it says nothing of which is better (docs/grpo.md).",
    )
    missing_eos_penalty: float | None = param(
        None,
        "online_dpo: subtracted from the reward of a completion cut at max_completion_length (it wrote no end "
        "token) before a prompt's two are compared (TRL's; encourages finishing within the length).",
    )
    num_generations_eval: int | None = param(
        None,
        "grpo, rloo: completions sampled per validation prompt when evaluating (default: num_generations; fewer "
        "evaluate faster).",
    )
    prompts_per_generation: int | None = param(
        None,
        "grpo, rloo, online_dpo: prompts sampled for in one generate call on each process, num_generations "
        "completions each (online_dpo: 2). Default: the whole sampling's, batch_size x gradient_accumulation, "
        "times the steps of steps_per_generation, as TRL samples its generation batch at once (a bigger batch "
        "decodes faster); lower it if sampling runs out of memory.",
    )
    generation_kwargs: dict | str | None = param(
        None,
        "grpo, rloo, online_dpo: more of generate's settings for sampling the completions (TRL's "
        "generation_kwargs; a JSON object on the command line), those tunelab passes on: no_repeat_ngram_size, "
        "min_new_tokens (not with tools), suppress_tokens, begin_suppress_tokens, bad_words_ids, sequence_bias, "
        "typical_p, epsilon_cutoff, eta_cutoff, exponential_decay_length_penalty, renormalize_logits (docs/grpo.md; "
        'e.g. {"no_repeat_ngram_size": 3}). The others are refused: temperature and the rest have a setting here; '
        "the group and the end tokens are tunelab's; beams, assisted decoding and stop_strings are not offered.",
    )
    tools: str | None = param(
        None,
        "grpo, rloo, online_dpo: Python functions the model may call while it writes a completion, comma-separated "
        "file.py:function (TRL's tools). The prompts show their schemas (from each function's type hints and its "
        "docstring's Args:); a call the model writes, in its chat template's form, is run and its result (or "
        "error) goes back as a tool turn, and the model writes on. Tool turns are not trained on and count "
        "towards max_completion_length; prompts with tools are never cut (raise max_prompt_length) (docs/grpo.md). "
        "Also package.module.function; from Python, function objects too.",
        functions="tool",
    )
    max_tool_calling_iterations: int | None = param(
        None,
        "grpo, rloo, online_dpo with tools: the most rounds of tool calls in one completion (TRL's; default: as "
        "many as max_completion_length leaves room for).",
    )
    temperature: float = param(1.0, "grpo, rloo, online_dpo: sampling temperature of the completions.")
    top_p: float = param(1.0, "grpo, rloo, online_dpo: nucleus sampling of the completions.")
    top_k: int = param(
        0, "grpo, rloo, online_dpo: sample from the k likeliest tokens only (0: from all, TRL's default)."
    )
    min_p: float | None = param(
        None,
        "grpo, rloo, online_dpo: leave out tokens below min_p times the likeliest token's probability (default: off).",
    )
    repetition_penalty: float = param(
        1.0,
        "grpo, rloo, online_dpo: above 1, tokens already in the prompt or the completion are sampled less (1: off).",
    )
    beta: float = param(
        0.0,
        "grpo: weight of the KL term to the reference model (0: none, no reference pass); rloo: of the KL penalty "
        "in the reward (TRL's RLOO defaults to 0.05).",
    )
    use_bias_correction_kl: bool = param(
        True, "grpo: weigh the KL term by the probability ratio (DeepSeek-V3.2's unbiased KL gradient, TRL's default)."
    )
    epsilon: float = param(
        0.2, "grpo, rloo: clipping range of the probability ratio (lower side, and upper by default)."
    )
    epsilon_high: float | None = param(
        None, "grpo, rloo: upper clipping range (DAPO's clip-higher; default: epsilon)."
    )
    loss_type: str = param(
        "dapo",
        "grpo: the loss and its normalisation: grpo (per completion), bnpo (per token of the micro-batch), dr_grpo "
        "(fixed length), dapo (per token of the whole step), cispo (the clipped ratio as a weight of the log-prob, "
        "not clipped away; per token of the whole step), sapo (a soft gate on the ratio in place of the clip; per "
        "completion), luspo (GSPO's loss, each completion's summed over its tokens: best with "
        "importance_sampling_level sequence), vespo (a smooth weight of the completion's whole ratio, vespo_*, in "
        "place of the clip; per token of the whole step).",
        ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"),
    )
    sapo_temperature_pos: float = param(
        1.0, "grpo (loss_type sapo): the gate's temperature where the advantage is positive (TRL's)."
    )
    sapo_temperature_neg: float = param(
        1.05, "grpo (loss_type sapo): the gate's temperature where the advantage is negative (TRL's)."
    )
    vespo_k_pos: float = param(
        2.0, "grpo (loss_type vespo): where the advantage is >= 0, the power k of the weight w^k e^(lambda (1 - w))."
    )
    vespo_lambda_pos: float = param(3.0, "grpo (loss_type vespo): where the advantage is >= 0, the decay lambda.")
    vespo_k_neg: float = param(3.0, "grpo (loss_type vespo): where the advantage is negative, the power k.")
    vespo_lambda_neg: float = param(2.0, "grpo (loss_type vespo): where the advantage is negative, the decay lambda.")
    multi_objective_aggregation: str = param(
        "sum_then_normalize",
        "grpo, several rewards: sum them, then scale as scale_rewards says; or normalize_then_sum (GDPO): each "
        "reward normalised within its group, the weighted sum then normalised over the whole sampling (a step's, "
        "or steps_per_generation's steps').",
        ("sum_then_normalize", "normalize_then_sum"),
    )
    top_entropy_quantile: float = param(
        1.0,
        "grpo: the policy loss on the most uncertain tokens only, this share of them by the entropy of the "
        "next-token distribution (Beyond the 80/20 Rule suggests 0.2; 1: every token).",
    )
    entropy_coef: float = param(
        0.0,
        "grpo: weight of an entropy bonus (the mean entropy of the trained tokens, subtracted from the loss): keeps "
        "the policy from collapsing to near-certain answers (0: none).",
    )
    use_adaptive_entropy: bool = param(
        False,
        "grpo: entropy_coef adjusted each step (Skywork-OR1): raised by entropy_coef_delta while the mean entropy is "
        "at or below entropy_target, lowered above it; the bonus counts only at or below the target.",
    )
    entropy_coef_min: float = param(0.0, "grpo (use_adaptive_entropy): the lowest entropy_coef.")
    entropy_coef_max: float = param(1.0, "grpo (use_adaptive_entropy): the highest entropy_coef.")
    entropy_coef_delta: float = param(0.005, "grpo (use_adaptive_entropy): how far entropy_coef moves each step.")
    entropy_target: float = param(
        0.2,
        "grpo (use_adaptive_entropy): the mean entropy (nats) under which the bonus acts; set it near the entropy "
        "the run logs early on.",
    )
    off_policy_mask_threshold: float | None = param(
        None,
        "grpo (num_iterations > 1 or steps_per_generation above gradient_accumulation): no loss on a completion "
        "with a negative advantage whose mean KL from the policy "
        "that sampled it is above this (DeepSeek-V3.2's off-policy sequence mask; e.g. 0.5).",
    )
    num_iterations: int = param(
        1,
        "grpo, rloo: optimizer steps on each batch of completions (TRL's num_iterations, mu in the GRPO paper): "
        "generation is the slow part; each step's prompts come round this many steps in a row, sampled once, "
        "and the probability ratio to the sampling policy (clipped by epsilon) comes into play.",
    )
    steps_per_generation: int | None = param(
        None,
        "grpo, rloo: micro-batches one sampling serves (TRL's; default gradient_accumulation: a sampling per "
        "optimizer step). A multiple of it: k x gradient_accumulation samples k steps' prompts at once, and each "
        "later step trains on completions of the policy before the earlier steps' updates, against their "
        "log-probs then (the ratio clipped by epsilon, as with num_iterations).",
    )
    importance_sampling_level: str = param(
        "token",
        "grpo: the probability ratio per token, or per completion (sequence: GSPO, the ratio of the completion's "
        "mean token log-probs, best with loss_type grpo).",
        ("token", "sequence"),
    )
    delta: float | None = param(
        None,
        "grpo: two-sided clipping (INTELLECT-2): the ratio is also capped at delta where the advantage is negative "
        "(above 1 + epsilon_high; default: unset).",
    )
    scale_rewards: str = param(
        "group", "grpo: divide advantages by the group's reward std, the batch's, or not.", ("group", "batch", "none")
    )
    mask_truncated_completions: bool = param(False, "grpo, rloo: no loss on completions cut at max_completion_length.")
    normalize_advantages: bool = param(
        False,
        "rloo: the leave-one-out advantages normalised to mean 0 and std 1 over the whole sampling (a step's, or "
        "steps_per_generation's steps'; every micro-batch of every process: TRL's generation batch).",
    )
    reward_clip_range: str | None = param(
        None,
        "rloo: the total reward of each completion clipped to min,max before the KL penalty and the baseline "
        "(TRL's reward_clip_range; e.g. -1,1).",
    )
    completions_every: int = param(
        10,
        "grpo, rloo, online_dpo: every N steps, write sample completions with their rewards to completions.jsonl "
        "(0: never).",
    )

    # --- logging and saving
    log: str = param("none", "Experiment tracker: none, tensorboard or wandb.", ("none", "tensorboard", "wandb"))
    logging_steps: int = param(-1, "Log every N steps (-1: about 25 points per run).")
    eval_strategy: str = param(
        "epoch", "When to evaluate on valid_split: no, steps or epoch.", ("no", "steps", "epoch")
    )
    early_stopping_patience: int | None = param(
        None,
        "Stop after this many evaluations without a lower eval loss, and keep the best checkpoint's weights (needs "
        "valid_split or valid_size). Unset: train to the end.",
    )
    early_stopping_threshold: float = param(
        0.0, "With early_stopping_patience: the smallest fall of the eval loss that counts."
    )
    save_total_limit: int = param(1, "Checkpoints kept while training.")
    save_steps: int = param(-1, SAVE_STEPS_HELP)
    resume: bool = param(True, RESUME_HELP)

    # --- hub
    push_to_hub: bool = param(False, "Upload the output folder to the hub when done (private).")
    username: str | None = param(None, "Hub user or organisation to push to.")
    repo_id: str | None = param(None, "Hub repository to push to (default: username/project_name).")
    token: str | None = param(None, "Hub token (never logged or written; HF_TOKEN is read too).", secret=True)

    # --- accepted for AutoTrain compatibility
    unsloth: bool = param(False, "Accepted for AutoTrain compatibility; tunelab's own fast path is always used.")
    use_flash_attention_2: bool = param(False, "Use flash-attention 2 kernels (CUDA, flash-attn installed).")

    # --- scaling out (launched through accelerate; see docs/scaling.md)
    distributed_backend: str | None = param(*LAUNCH["distributed_backend"])
    num_processes: int = param(*LAUNCH["num_processes"])
    num_machines: int = param(*LAUNCH["num_machines"])
    machine_rank: int = param(*LAUNCH["machine_rank"])
    main_process_ip: str | None = param(*LAUNCH["main_process_ip"])
    main_process_port: int = param(*LAUNCH["main_process_port"])
    accelerate_config: str | None = param(*LAUNCH["accelerate_config"])

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ checks
    def _check_regularisers(self) -> None:
        aux = self.router_aux_loss_coef
        if aux is not None and (isinstance(aux, bool) or not isinstance(aux, int | float) or not 0 <= aux < math.inf):
            raise ConfigError(f"router_aux_loss_coef must be 0 or positive, got {aux!r}")
        if self.neftune_noise_alpha is not None:
            if not self.neftune_noise_alpha > 0:
                raise ConfigError(f"neftune_noise_alpha must be positive, got {self.neftune_noise_alpha}")
            if self.trainer not in ("default", "sft"):
                raise ConfigError(f"neftune_noise_alpha is for trainers default and sft, not {self.trainer}")
        if self.early_stopping_patience is None:
            return
        check_positive(self, "early_stopping_patience")
        per_source = isinstance(self.data_path, list) and any(
            isinstance(source, dict) and source.get("valid_split") for source in self.data_path
        )
        if not (self.valid_split or self.valid_size or per_source):
            raise ConfigError(
                "early_stopping_patience stops on the eval loss: give a validation split (valid_split, or valid_size "
                "to hold one out of the train split)"
            )
        if self.eval_strategy == "no":
            raise ConfigError("early_stopping_patience needs evaluations: eval_strategy steps or epoch, not no")
        if REGISTRY[self.trainer].data == "prompts":
            raise ConfigError(f"early_stopping_patience: {self.trainer}'s evaluation has no eval loss to stop on")

    def _check_added_tokens(self) -> None:
        """LoRA on the embedding or the output head leaves PEFT no way to train an added token's rows there
        (models/vocabulary.py says so again for a model whose modules are named otherwise)."""
        if not (self.peft and listed_tokens(self) and self.target_modules):
            return
        names = [name.strip() for name in str(self.target_modules).split(",")]
        adapted = [name for name in names if name in EMBEDDING_MODULES]
        if adapted:
            raise ConfigError(
                f"add_tokens with LoRA on {adapted[0]} (target_modules): PEFT cannot train the added tokens' rows of "
                f"a module LoRA adapts; leave it out, or add modules_to_save: {adapted[0]} to train it whole"
            )

    @property
    def completions_per_prompt(self) -> int:
        """grpo, rloo: num_generations; online_dpo: the two completions of a pair."""
        return 2 if self.trainer == "online_dpo" else self.num_generations

    @property
    def steps_sampled_together(self) -> int:
        """grpo, rloo: the optimizer steps one sampling serves (steps_per_generation / gradient_accumulation)."""
        return max((self.steps_per_generation or self.gradient_accumulation) // self.gradient_accumulation, 1)

    @property
    def prompts_sampled_at_once(self) -> int:
        """grpo, rloo: the prompts one generate call samples for on each process (prompts_per_generation, at most
        the sampling's: a step's, or steps_sampled_together steps')."""
        sampling = self.batch_size * self.gradient_accumulation * self.steps_sampled_together
        return min(self.prompts_per_generation or sampling, sampling)

    @property
    def reward_clip_values(self) -> tuple[float, float] | None:
        """reward_clip_range as (min, max), None when unset."""
        if self.reward_clip_range is None:
            return None
        low, high = (float(value) for value in str(self.reward_clip_range).split(","))
        return low, high

    @property
    def dpo_loss_types(self) -> tuple[str, ...]:
        """dpo_loss_type as a tuple of loss names."""
        return tuple(kind.strip() for kind in str(self.dpo_loss_type).split(",") if kind.strip())

    @property
    def dpo_loss_weight_values(self) -> tuple[float, ...] | None:
        """dpo_loss_weights as numbers (None: 1 each)."""
        if self.dpo_loss_weights is None:
            return None
        return tuple(float(weight) for weight in str(self.dpo_loss_weights).split(",") if weight.strip())

    def validate(self) -> None:
        """Raise ConfigError naming the parameter for any value that cannot work, before anything is loaded."""
        for item in dataclasses.fields(self):  # functions handed over where load_config was not the way in
            if item.metadata.get("functions"):
                value = function_specs(getattr(self, item.name), item.metadata["functions"], item.name)
                setattr(self, item.name, value)
        if self.chat_template in ("", "null"):
            self.chat_template = None
        custom_chat_template(self.chat_template)  # a template file that cannot be read is found now
        self.chat_template_kwargs = template_variables(self.chat_template_kwargs)
        self.add_tokens = token_list(self.add_tokens, "add_tokens")
        self.add_special_tokens = token_list(self.add_special_tokens, "add_special_tokens")
        self._check_added_tokens()
        check_freezing(self)
        # TRL's and Axolotl's `gradient_checkpointing: true`, in a config file or as --gradient-checkpointing true
        switch = str(self.gradient_checkpointing).lower()
        if switch in ("true", "yes", "1", "false", "no", "0"):
            self.gradient_checkpointing = "on" if switch in ("true", "yes", "1") else "off"
        read_rope_scaling(self)
        check_choices(self)
        if self.disable_gradient_checkpointing and self.gradient_checkpointing == "on":
            raise ConfigError(
                "disable_gradient_checkpointing: true and gradient_checkpointing: on contradict each other: keep one"
            )
        check_positive(self, "lr", "epochs", "batch_size", "gradient_accumulation", "lora_r", "lora_alpha")
        check_positive(self, "model_max_length", "save_total_limit", "max_prompt_length", "checkpoint_every")
        check_save_steps(self)
        check_launch(self)
        check_valid_size(self)
        if self.block_size == -1:
            self.block_size = min(1024, self.model_max_length)
        check_positive(self, "block_size")
        if self.dataset_num_proc is not None:
            check_positive(self, "dataset_num_proc")
        for name in ("image_max_pixels", "image_min_pixels"):
            if getattr(self, name) is not None:
                check_positive(self, name)
        if (self.image_min_pixels or 0) > (self.image_max_pixels or float("inf")):
            raise ConfigError(
                f"image_min_pixels ({self.image_min_pixels}) is larger than image_max_pixels ({self.image_max_pixels})"
            )
        if self.streaming and self.max_steps <= 0:
            raise ConfigError(
                "streaming: true needs max_steps (--max-steps): a streamed run does not count its rows before training"
            )
        if self.block_size > self.model_max_length:
            raise ConfigError(
                f"block_size ({self.block_size}) is larger than model_max_length ({self.model_max_length}): "
                "lower block_size or raise model_max_length"
            )
        if self.trainer not in REGISTRY:
            raise ConfigError(f"trainer: {self.trainer!r} is not one of {', '.join(REGISTRY)}")
        if REGISTRY[self.trainer].data in ("pairs", "labeled"):
            # AutoTrain's length rules for preference data, checked before anything is loaded.
            for name in ("max_prompt_length", "max_completion_length"):
                value = getattr(self, name)
                for limit in ("block_size", "model_max_length"):
                    if value is not None and value > getattr(self, limit):
                        raise ConfigError(
                            f"{name} ({value}) is larger than {limit} ({getattr(self, limit)}): prompt and answer "
                            f"together must fit in block_size"
                        )
        if self.max_completion_length is not None:
            check_positive(self, "max_completion_length")
        if self.dpo_beta <= 0:
            raise ConfigError(f"dpo_beta must be positive, got {self.dpo_beta}")
        check_preference(self)
        check_own_settings(self)
        if self.trainer in ("dpo", "online_dpo"):  # (online_dpo trains its pairs with dpo's loss)
            check_dpo(self)
        if self.trainer == "kto":
            check_kto(self)
        if self.trainer == "reward":
            check_reward(self)
        self._check_regularisers()
        if self.trainer == "distill":
            check_distill(self)
        if REGISTRY[self.trainer].data == "prompts":  # methods that generate and score their completions
            check_sampled(self)
        check_training(self)
