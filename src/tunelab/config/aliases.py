"""AutoTrain Advanced's spellings, as data: its task names and its old and alternative parameter names.

The only home of that knowledge. `config/overrides.py` applies the parameter spellings to flags, config keys and
Python keywords; `config/autotrain.py` reads AutoTrain's nested config schema with them; `config/docs.py` lists
them in docs/config.md.
"""

from __future__ import annotations

from typing import Any

# AutoTrain task -> tunelab trainer (AutoTrain: `llm` and `llm-generic` train the plain causal-LM objective).
TASKS = {
    "llm": "default",
    "llm-generic": "default",
    "llm-default": "default",
    "llm-sft": "sft",
    "llm-reward": "reward",
    "llm-dpo": "dpo",
    "llm-orpo": "orpo",
    "llm-grpo": "grpo",
    "vlm:vqa": "sft",
    "vlm:captioning": "sft",
}
# AutoTrain's vision-language tasks (`autotrain vlm --trainer vqa|captioning`, config task vlm:vqa / vlm:captioning):
# sft on a vision-language model, the image shown before the question (vqa) or alone (captioning), with AutoTrain's
# column defaults.
VLM_TRAINERS: dict[str, dict[str, str]] = {
    "vqa": {"image_column": "image", "prompt_text_column": "prompt"},
    "captioning": {"image_column": "image"},
}
VLM_TASKS = {"vlm:vqa": "vqa", "vlm:captioning": "captioning"}
# Tasks that are not LLM training methods: read into TextClassificationParams.
CLASSIFICATION_TASKS = ("text_classification", "text-classification")

# Old and alternative flag / key spellings -> (field, value to set or None to take the given value).
ALIASES: dict[str, tuple[str, Any]] = {
    "use_peft": ("peft", True),
    "use_int4": ("quantization", "int4"),
    "use_int8": ("quantization", "int8"),
    "fp16": ("mixed_precision", "fp16"),
    "bf16": ("mixed_precision", "bf16"),
    "learning_rate": ("lr", None),
    "num_train_epochs": ("epochs", None),
    "train_batch_size": ("batch_size", None),
    "per_device_train_batch_size": ("batch_size", None),
    "gradient_accumulation_steps": ("gradient_accumulation", None),
    "warmup_steps_ratio": ("warmup_ratio", None),
    "lora_rank": ("lora_r", None),
    "model_name": ("model", None),
    "base_model": ("model", None),
    "data": ("data_path", None),
    "lr_scheduler_type": ("scheduler", None),
    "optim": ("optimizer", None),
    "evaluation_strategy": ("eval_strategy", None),
    "max_seq_length": ("block_size", None),
    "hub_token": ("token", None),
    "hub_model_id": ("repo_id", None),
    "tokens": ("add_tokens", None),  # Axolotl's
    "teacher_model_name_or_path": ("teacher_model", None),  # TRL's
}
