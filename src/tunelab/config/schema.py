"""The parameter object of an LLM fine-tuning run: tunelab's counterpart of AutoTrain's `LLMTrainingParams`.

Every field is described and defaulted once, here. The CLI flags (`cli.py`), the AutoTrain YAML translator
(`config/autotrain.py`), the Python API and `docs/config.md` are all derived from this dataclass.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
CHAT_TEMPLATES = ("none", "zephyr", "chatml", "tokenizer", "alpaca")
PREFERENCE_TRAINERS = ("reward", "dpo", "orpo")
# The launch fields every task shares: (default, help[, choices]).
LAUNCH: dict[str, tuple] = {
    "distributed_backend": (
        None,
        "How several processes share the work: ddp (a model copy per GPU), fsdp (weights, gradients and optimizer "
        "sharded, FSDP2), deepspeed (ZeRO-3 with CPU offload); none: ddp when num_processes > 1.",
        (None, "ddp", "fsdp", "deepspeed"),
    ),
    "num_processes": (1, "Processes (one per GPU) on each machine; more than 1 launches through accelerate."),
    "num_machines": (1, "Machines taking part (multi-node: run the same command on each, with its machine_rank)."),
    "machine_rank": (0, "This machine's rank among num_machines (0 on the head machine)."),
    "main_process_ip": (None, "Address of the head machine (machine_rank 0), for multi-node runs."),
    "main_process_port": (29500, "Port of the head machine, for multi-node runs."),
    "accelerate_config": (
        None,
        "An accelerate config file to launch with instead of the one tunelab ships for distributed_backend.",
    ),
}
SAVE_STEPS_HELP = "Write a checkpoint (to resume from) every N optimizer steps; -1: twice per run, at most every 500."
RESUME_HELP = (
    "Continue an interrupted run of the same project_name from its last complete checkpoint (same data order, "
    "optimizer, scheduler and random state); false: discard it and start over."
)


def _f(default: Any, help: str, choices: tuple | None = None, secret: bool = False) -> Any:
    """A dataclass field whose help text (and allowed values) travel with it to the CLI and the docs."""
    meta: dict[str, Any] = {"help": help, "secret": secret}
    if choices is not None:
        meta["choices"] = choices
    return field(default=default, metadata=meta, repr=not secret)


class Params:
    """What every parameter object shares: a redacted dict/JSON view (the token never leaves as itself)."""

    def to_dict(self, redact: bool = True) -> dict[str, Any]:
        """All parameters as plain values; secrets replaced by '***' unless redact is False."""
        values = dataclasses.asdict(self)
        if redact:
            for f in dataclasses.fields(self):
                if f.metadata.get("secret") and values.get(f.name):
                    values[f.name] = "***"
        return values

    def to_json(self) -> str:
        """The redacted parameters as JSON (what lands in training_params.json)."""
        return json.dumps(self.to_dict(redact=True), indent=2, sort_keys=True)


@dataclass
class LLMParams(Params):
    """Everything that defines an LLM fine-tuning run. Names follow AutoTrain Advanced's `LLMTrainingParams`."""

    # --- what to train, on what, where to put it
    model: str = _f(DEFAULT_MODEL, "Base model: a Hugging Face hub id, a local model folder, or a .gguf file.")
    project_name: str = _f(
        "project-name", "Output folder of the run (created when the run completes; must not exist yet)."
    )
    data_path: str = _f(
        "data", "Data: a CSV/JSONL/JSON/Parquet file, a folder holding <train_split>.<ext>, or a hub dataset id."
    )
    train_split: str = _f("train", "Name of the training split (the file stem inside a data folder).")
    valid_split: str | None = _f(None, "Name of the validation split; none means no evaluation.")
    trainer: str = _f(
        "default",
        "Training method: `default` (causal LM over text cut into blocks), `sft` (per example, loss on the "
        "answer), `reward` (reward model), `dpo` or `orpo` (preference pairs). The list is tunelab.methods.METHODS.",
    )

    # --- data shape
    text_column: str = _f("text", "Column with the text, the message list, or (preference data) the chosen answer.")
    prompt_text_column: str | None = _f(
        None, "Column with the prompt, for prompt/completion data (the completion is in text_column)."
    )
    rejected_text_column: str | None = _f(None, "Column with the rejected answer (preference trainers).")
    chat_template: str | None = _f(
        None,
        "How rows become text: none (text used as is), zephyr, chatml, tokenizer (the model's own template), "
        "alpaca (the Alpaca instruction prompt). Unset: picked from the data (see docs/data.md).",
        (None, *CHAT_TEMPLATES),
    )
    add_eos_token: bool = _f(True, "Append the end-of-sequence token to each text (plain-text rows).")
    completion_only_loss: bool = _f(
        True, "sft: train only on assistant/completion tokens of chat and prompt/completion rows."
    )
    bad_rows: str = _f(
        "error",
        "Rows that cannot be used (missing, empty or wrong-typed fields, bad messages): `error` lists them with "
        "file, line and column and stops before training; `skip` drops them and logs how many and which.",
        ("error", "skip"),
    )
    packing: bool = _f(False, "sft: pack several examples into each block_size row (attention kept per example).")
    group_by_length: bool = _f(
        True, "Without packing: batch examples (or preference pairs) of similar length together (less padding)."
    )

    # --- lengths
    block_size: int = _f(1024, "Tokens per training row; longer examples are truncated (and counted). -1: auto.")
    model_max_length: int = _f(2048, "Longest sequence the model is asked to handle.")
    max_prompt_length: int = _f(128, "Preference trainers: longest prompt kept (truncated from the left).")
    max_completion_length: int | None = _f(None, "Preference trainers: longest completion kept.")
    padding: str = _f("right", "Side to pad batches on.", ("left", "right"))

    # --- optimisation
    lr: float = _f(3e-5, "Peak learning rate.")
    epochs: int = _f(1, "Passes over the training data.")
    max_steps: int = _f(-1, "Stop after this many optimizer steps (-1: run all epochs).")
    batch_size: int = _f(2, "Examples (rows) per device per step.")
    gradient_accumulation: int = _f(4, "Micro-batches accumulated per optimizer step.")
    auto_find_batch_size: bool = _f(False, "Halve the batch size on out-of-memory until it fits.")
    warmup_ratio: float = _f(0.1, "Fraction of steps spent warming the learning rate up.")
    optimizer: str = _f("adamw_torch", "Optimizer, any transformers `optim` name (e.g. adamw_torch, adamw_8bit).")
    scheduler: str = _f("linear", "Learning-rate schedule (linear, cosine, constant, ...).")
    weight_decay: float = _f(0.0, "Weight decay.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.")
    seed: int = _f(42, "Random seed (data order, initialisation, dropout).")
    mixed_precision: str | None = _f(
        None, "fp16 (CUDA only) or bf16; none trains in the model's float32.", (None, "no", "fp16", "bf16")
    )
    disable_gradient_checkpointing: bool = _f(False, "Turn gradient checkpointing off (faster, more memory).")
    checkpoint_every: int = _f(
        1,
        "With gradient checkpointing on, checkpoint only every Nth decoder layer: 1 checkpoints all (least memory);"
        " 2, 3, ... keep the other layers' activations (less recomputation, more memory).",
    )
    fast_loss: bool = _f(
        True, "Compute the loss from hidden states at the answer positions, in chunks (no full logits)."
    )
    torch_compile: bool = _f(False, "Compile each decoder layer with torch.compile (pays off on GPUs).")
    fused_ops: bool = _f(
        True,
        "Memory-lean RMSNorm, SwiGLU and LoRA dropout (Llama-family models): same maths, fewer saved activations;"
        " under LoRA the norms' and SwiGLU's outputs are rebuilt in the backward pass instead of kept.",
    )

    # --- PEFT / quantization
    peft: bool = _f(False, "Train a LoRA adapter instead of all weights.")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha (scale = alpha / r).")
    lora_dropout: float = _f(0.05, "LoRA dropout.")
    target_modules: str | None = _f(
        "all-linear", "Modules LoRA adapts: all-linear, or comma-separated names (q_proj,v_proj)."
    )
    quantization: str | None = _f(
        None, "Load the base model in int4 or int8 (QLoRA; needs peft and CUDA).", (None, "int4", "int8")
    )
    merge_adapter: bool = _f(
        False,
        "After LoRA training, also save the adapter merged into a full model (merged/). "
        "Without peft the full model is saved anyway.",
    )

    # --- preference trainers
    model_ref: str | None = _f(
        None, "dpo: reference model (default: the base model with the adapter off, or a frozen copy without peft)."
    )
    dpo_beta: float = _f(
        0.1, "dpo: beta (strength of the pull towards the reference); orpo: weight of the odds ratio."
    )

    # --- logging and saving
    log: str = _f("none", "Experiment tracker: none, tensorboard or wandb.", ("none", "tensorboard", "wandb"))
    logging_steps: int = _f(-1, "Log every N steps (-1: about 25 points per run).")
    eval_strategy: str = _f("epoch", "When to evaluate on valid_split: no, steps or epoch.", ("no", "steps", "epoch"))
    save_total_limit: int = _f(1, "Checkpoints kept while training.")
    save_steps: int = _f(-1, SAVE_STEPS_HELP)
    resume: bool = _f(True, RESUME_HELP)

    # --- hub
    push_to_hub: bool = _f(False, "Upload the output folder to the hub when done (private).")
    username: str | None = _f(None, "Hub user or organisation to push to.")
    repo_id: str | None = _f(None, "Hub repository to push to (default: username/project_name).")
    token: str | None = _f(None, "Hub token (never logged or written; HF_TOKEN is read too).", secret=True)

    # --- accepted for AutoTrain compatibility
    unsloth: bool = _f(False, "Accepted for AutoTrain compatibility; tunelab's own fast path is always used.")
    use_flash_attention_2: bool = _f(False, "Use flash-attention 2 kernels (CUDA, flash-attn installed).")

    # --- scaling out (launched through accelerate; see docs/scaling.md)
    distributed_backend: str | None = _f(*LAUNCH["distributed_backend"])
    num_processes: int = _f(*LAUNCH["num_processes"])
    num_machines: int = _f(*LAUNCH["num_machines"])
    machine_rank: int = _f(*LAUNCH["machine_rank"])
    main_process_ip: str | None = _f(*LAUNCH["main_process_ip"])
    main_process_port: int = _f(*LAUNCH["main_process_port"])
    accelerate_config: str | None = _f(*LAUNCH["accelerate_config"])

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ConfigError naming the parameter for any value that cannot work, before anything is loaded."""
        if self.chat_template in ("", "null"):
            self.chat_template = None
        check_choices(self)
        _positive(self, "lr", "epochs", "batch_size", "gradient_accumulation", "lora_r", "lora_alpha")
        _positive(self, "model_max_length", "save_total_limit", "max_prompt_length", "checkpoint_every")
        check_save_steps(self)
        check_launch(self)
        if self.block_size == -1:
            self.block_size = min(1024, self.model_max_length)
        _positive(self, "block_size")
        if self.block_size > self.model_max_length:
            raise ConfigError(
                f"block_size ({self.block_size}) is larger than model_max_length ({self.model_max_length}): "
                "lower block_size or raise model_max_length"
            )
        if self.trainer in PREFERENCE_TRAINERS:
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
            _positive(self, "max_completion_length")
        if self.dpo_beta <= 0:
            raise ConfigError(f"dpo_beta must be positive, got {self.dpo_beta}")
        check_training(self)
        from tunelab.methods import REGISTRY

        if self.trainer not in REGISTRY:
            raise ConfigError(f"trainer: {self.trainer!r} is not one of {', '.join(REGISTRY)}")


def check_choices(params: Any) -> None:
    """Every field with a list of allowed values holds one of them ("no" mixed precision means none)."""
    if params.mixed_precision == "no":
        params.mixed_precision = None
    for f in dataclasses.fields(params):
        choices = f.metadata.get("choices")
        value = getattr(params, f.name)
        if choices is not None and value not in choices:
            shown = ", ".join("none" if c is None else str(c) for c in choices)
            raise ConfigError(f"{f.name}: {value!r} is not one of {shown}")


def check_training(params: Any) -> None:
    """The checks every task's parameters share: schedule, steps, LoRA, quantization, hub."""
    if not 0 <= params.warmup_ratio < 1:
        raise ConfigError(f"warmup_ratio must be in [0, 1), got {params.warmup_ratio}")
    if not 0 <= params.lora_dropout < 1:
        raise ConfigError(f"lora_dropout must be in [0, 1), got {params.lora_dropout}")
    if params.max_steps == 0 or params.max_steps < -1:
        raise ConfigError(f"max_steps must be a positive number of steps or -1, got {params.max_steps}")
    if params.quantization is not None and not params.peft:
        raise ConfigError(f"quantization={params.quantization} trains a LoRA adapter on a quantized model: add --peft")
    if params.push_to_hub and not (params.repo_id or params.username):
        raise ConfigError("push_to_hub needs username (or repo_id) to know where to push")


def check_launch(params: Any) -> None:
    """Launch settings that cannot work, found before anything starts."""
    _positive(params, "num_processes", "num_machines", "main_process_port")
    if not 0 <= params.machine_rank < params.num_machines:
        raise ConfigError(f"machine_rank must be in [0, num_machines), got {params.machine_rank}")
    if params.num_machines > 1 and not params.main_process_ip:
        raise ConfigError("a multi-node run (num_machines > 1) needs main_process_ip: the head machine's address")
    if params.accelerate_config and not Path(params.accelerate_config).expanduser().is_file():
        raise ConfigError(f"accelerate_config: {params.accelerate_config} is not a file")


def check_save_steps(params: Any) -> None:
    if params.save_steps == 0 or params.save_steps < -1:
        raise ConfigError(f"save_steps must be a positive number of steps or -1, got {params.save_steps}")


def _positive(params: Any, *names: str) -> None:
    for name in names:
        value = getattr(params, name)
        if value is None or value <= 0:
            raise ConfigError(f"{name} must be positive, got {value}")


def field_names(schema: type = LLMParams) -> list[str]:
    """The names of every parameter of a parameter class, in declaration order."""
    return [f.name for f in dataclasses.fields(schema)]
