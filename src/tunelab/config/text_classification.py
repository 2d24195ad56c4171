"""The parameter object of a text-classification run: tunelab's counterpart of AutoTrain's
`TextClassificationParams` (task `text_classification`). Same conventions as config/schema.py."""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.config.schema import (
    DEFAULT_MODEL,
    LAUNCH,
    RESUME_HELP,
    SAVE_STEPS_HELP,
    Params,
    _f,
    _positive,
    check_choices,
    check_launch,
    check_save_steps,
    check_training,
)
from tunelab.errors import ConfigError


@dataclass
class TextClassificationParams(Params):
    """Everything that defines a text-classification run. Names follow AutoTrain Advanced."""

    model: str = _f(DEFAULT_MODEL, "Base model: a hub id, a local model folder or a .gguf file (encoder or decoder).")
    project_name: str = _f(
        "project-name", "Output folder of the run (created when the run completes; must not exist yet)."
    )
    data_path: str = _f("data", "A CSV/JSONL/JSON/Parquet file, a folder holding <split>.<ext>, or a hub dataset id.")
    train_split: str = _f("train", "Name of the training split.")
    valid_split: str | None = _f(None, "Name of the validation split (evaluated every epoch); none: no evaluation.")
    text_column: str = _f("text", "Column with the text to classify.")
    target_column: str = _f("target", "Column with the label (names or integers).")
    max_seq_length: int = _f(128, "Longest text in tokens; longer texts are truncated (and counted).")

    lr: float = _f(5e-5, "Peak learning rate.")
    epochs: int = _f(3, "Passes over the training data.")
    max_steps: int = _f(-1, "Stop after this many optimizer steps (-1: train for `epochs`).")
    batch_size: int = _f(8, "Texts per device per step.")
    gradient_accumulation: int = _f(1, "Steps whose gradients are summed before each optimizer update.")
    warmup_ratio: float = _f(0.1, "Fraction of steps spent warming the learning rate up.")
    optimizer: str = _f("adamw_torch", "Optimizer, any transformers `optim` name.")
    scheduler: str = _f("linear", "Learning-rate schedule (linear, cosine, constant, ...).")
    weight_decay: float = _f(0.0, "Weight decay.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.")
    seed: int = _f(42, "Random seed.")
    mixed_precision: str | None = _f(
        None, "fp16 (CUDA only) or bf16; none trains in float32.", (None, "no", "fp16", "bf16")
    )
    auto_find_batch_size: bool = _f(False, "Halve the batch size on out-of-memory errors and retry.")
    early_stopping_patience: int = _f(5, "Stop after this many evaluations without improvement (with valid_split).")
    early_stopping_threshold: float = _f(0.01, "Smallest improvement of the eval loss that counts.")
    eval_strategy: str = _f("epoch", "When to evaluate on valid_split: no, steps or epoch.", ("no", "steps", "epoch"))
    logging_steps: int = _f(-1, "Log every N steps (-1: about 25 points per run).")
    save_total_limit: int = _f(1, "Checkpoints kept while training.")
    save_steps: int = _f(-1, SAVE_STEPS_HELP)
    resume: bool = _f(True, RESUME_HELP)
    log: str = _f("none", "Experiment tracker: none, tensorboard or wandb.", ("none", "tensorboard", "wandb"))

    peft: bool = _f(False, "Train a LoRA adapter (and the new classification head) instead of all weights.")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha.")
    lora_dropout: float = _f(0.05, "LoRA dropout.")
    target_modules: str | None = _f("all-linear", "Modules given LoRA adapters: all-linear or a comma-separated list.")
    quantization: str | None = _f(
        None, "Load the base model in int4 or int8 (CUDA only; with peft).", (None, "int4", "int8")
    )
    disable_gradient_checkpointing: bool = _f(True, "Gradient checkpointing is off by default for classifiers.")

    push_to_hub: bool = _f(False, "Upload the output folder to the hub when done (private).")
    username: str | None = _f(None, "Hub user or organisation to push to.")
    repo_id: str | None = _f(None, "Hub repository to push to (default: username/project_name).")
    token: str | None = _f(None, "Hub token (never logged or written; HF_TOKEN is read too).", secret=True)

    distributed_backend: str | None = _f(*LAUNCH["distributed_backend"])
    num_processes: int = _f(*LAUNCH["num_processes"])
    num_machines: int = _f(*LAUNCH["num_machines"])
    machine_rank: int = _f(*LAUNCH["machine_rank"])
    main_process_ip: str | None = _f(*LAUNCH["main_process_ip"])
    main_process_port: int = _f(*LAUNCH["main_process_port"])
    accelerate_config: str | None = _f(*LAUNCH["accelerate_config"])

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the parameter for any value that cannot work, before anything is loaded."""
        check_choices(self)
        _positive(self, "lr", "epochs", "batch_size", "gradient_accumulation", "max_seq_length", "lora_r")
        _positive(self, "early_stopping_patience", "save_total_limit")
        check_save_steps(self)
        check_launch(self)
        if self.text_column == self.target_column:
            raise ConfigError(f"text_column and target_column are both {self.text_column!r}")
        check_training(self)
