"""The parameter object of a text-classification run: tunelab's counterpart of AutoTrain's
`TextClassificationParams` (task `text_classification`). Same conventions as config/llm.py (config/base.py)."""

from __future__ import annotations

from dataclasses import dataclass
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
    param,
)
from tunelab.errors import ConfigError


@dataclass
class TextClassificationParams(Params):
    """Everything that defines a text-classification run. Names follow AutoTrain Advanced."""

    task: ClassVar[str] = "text_classification"
    trainer: ClassVar[str] = "text_classification"
    # What an LLM run can switch and a classifier cannot: fixed here, so shared code (config/base.RunParams) reads
    # them the same way for both tasks. A classifier's loss needs its logits, and its fused ops are not written.
    packing: ClassVar[bool] = False
    fast_loss: ClassVar[bool] = False
    fused_ops: ClassVar[bool] = False
    torch_compile: ClassVar[bool] = False
    checkpoint_every: ClassVar[int] = 1
    use_flash_attention_2: ClassVar[bool] = False

    model: str = param(
        DEFAULT_MODEL, "Base model: a hub id, a local model folder or a .gguf file (encoder or decoder)."
    )
    project_name: str = param(
        "project-name", "Output folder of the run (created when the run completes; must not exist yet)."
    )
    data_path: str = param(
        "data", "A CSV/JSONL/JSON/Parquet file, a folder holding <split>.<ext>, or a hub dataset id."
    )
    train_split: str = param("train", "Name of the training split.")
    valid_split: str | None = param(None, "Name of the validation split (evaluated every epoch); none: no evaluation.")
    valid_size: float | None = param(
        None,
        "For data without a validation split: hold out this share of the train split's examples (0 < x < 1), or "
        "this many (a whole number), drawn per label with `seed`, and evaluate on them.",
    )
    text_column: str = param("text", "Column with the text to classify.")
    target_column: str = param("target", "Column with the label (names or integers).")
    max_seq_length: int = param(128, "Longest text in tokens; longer texts are truncated (and counted).")
    bad_rows: str = param("error", BAD_ROWS_HELP, ("error", "skip"))
    group_by_length: bool = param(True, "Batch texts of similar length together (less padding, so faster).")

    # 1e-4, not AutoTrain's 5e-5: one epoch of batch 8 at 5e-5 under-trains (docs/text-classification.md).
    lr: float = param(1e-4, "Peak learning rate.")
    head_lr_ratio: float = param(
        1.0, "The new classification head learns at lr x this (its weights start random, the body's do not)."
    )
    epochs: int = param(3, "Passes over the training data.")
    max_steps: int = param(-1, "Stop after this many optimizer steps (-1: train for `epochs`).")
    batch_size: int = param(8, "Texts per device per step.")
    gradient_accumulation: int = param(1, "Steps whose gradients are summed before each optimizer update.")
    warmup_ratio: float = param(0.1, "Fraction of steps spent warming the learning rate up.")
    optimizer: str = param("adamw_torch", "Optimizer, any transformers `optim` name.")
    scheduler: str = param("linear", "Learning-rate schedule (linear, cosine, constant, ...).")
    weight_decay: float = param(0.0, "Weight decay.")
    max_grad_norm: float = param(1.0, "Gradient clipping norm.")
    seed: int = param(42, "Random seed.")
    mixed_precision: str | None = param(
        None,
        "fp16 (CUDA only) or bf16 (a GPU, or a CPU with bf16 instructions: AVX512-BF16 or AMX); none trains in"
        " float32.",
        (None, "no", "fp16", "bf16"),
    )
    auto_find_batch_size: bool = param(False, "Halve the batch size on out-of-memory errors and retry.")
    early_stopping_patience: int = param(5, "Stop after this many evaluations without improvement (with valid_split).")
    early_stopping_threshold: float = param(0.01, "Smallest improvement of the eval loss that counts.")
    eval_strategy: str = param(
        "epoch", "When to evaluate on valid_split: no, steps or epoch.", ("no", "steps", "epoch")
    )
    logging_steps: int = param(-1, "Log every N steps (-1: about 25 points per run).")
    save_total_limit: int = param(1, "Checkpoints kept while training.")
    save_steps: int = param(-1, SAVE_STEPS_HELP)
    resume: bool = param(True, RESUME_HELP)
    log: str = param("none", "Experiment tracker: none, tensorboard or wandb.", ("none", "tensorboard", "wandb"))

    peft: bool = param(False, "Train a LoRA adapter (and the new classification head) instead of all weights.")
    lora_r: int = param(16, "LoRA rank.")
    lora_alpha: int = param(32, "LoRA alpha.")
    lora_dropout: float = param(0.05, "LoRA dropout.")
    target_modules: str | None = param(
        "all-linear", "Modules given LoRA adapters: all-linear or a comma-separated list."
    )
    use_dora: bool = param(*LORA_VARIANTS["use_dora"])
    use_rslora: bool = param(*LORA_VARIANTS["use_rslora"])
    init_lora_weights: str = param(*LORA_VARIANTS["init_lora_weights"])
    loraplus_lr_ratio: float | None = param(*LORA_VARIANTS["loraplus_lr_ratio"])
    lora_rank_pattern: str | None = param(*LORA_VARIANTS["lora_rank_pattern"])
    lora_alpha_pattern: str | None = param(*LORA_VARIANTS["lora_alpha_pattern"])
    modules_to_save: str | None = param(*LORA_VARIANTS["modules_to_save"])
    quantization: str | None = param(
        None, "Load the base model in int4 or int8 (CUDA only; with peft).", (None, "int4", "int8")
    )
    freeze_trainable_layers: int | None = param(*FREEZE_SETTINGS["freeze_trainable_layers"])
    freeze_trainable_modules: str = param(*FREEZE_SETTINGS["freeze_trainable_modules"])
    freeze_extra_modules: str | None = param(*FREEZE_SETTINGS["freeze_extra_modules"])
    unfrozen_parameters: list | str | None = param(*FREEZE_SETTINGS["unfrozen_parameters"])
    disable_gradient_checkpointing: bool = param(True, "Gradient checkpointing is off by default for classifiers.")

    push_to_hub: bool = param(False, "Upload the output folder to the hub when done (private).")
    username: str | None = param(None, "Hub user or organisation to push to.")
    repo_id: str | None = param(None, "Hub repository to push to (default: username/project_name).")
    token: str | None = param(None, "Hub token (never logged or written; HF_TOKEN is read too).", secret=True)

    distributed_backend: str | None = param(*LAUNCH["distributed_backend"])
    num_processes: int = param(*LAUNCH["num_processes"])
    num_machines: int = param(*LAUNCH["num_machines"])
    machine_rank: int = param(*LAUNCH["machine_rank"])
    main_process_ip: str | None = param(*LAUNCH["main_process_ip"])
    main_process_port: int = param(*LAUNCH["main_process_port"])
    accelerate_config: str | None = param(*LAUNCH["accelerate_config"])

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the parameter for any value that cannot work, before anything is loaded."""
        check_choices(self)
        check_freezing(self)
        check_positive(self, "lr", "epochs", "batch_size", "gradient_accumulation", "max_seq_length", "lora_r")
        check_positive(self, "head_lr_ratio", "early_stopping_patience", "save_total_limit")
        check_save_steps(self)
        check_launch(self)
        check_valid_size(self)
        if self.text_column == self.target_column:
            raise ConfigError(f"text_column and target_column are both {self.text_column!r}")
        check_training(self)
