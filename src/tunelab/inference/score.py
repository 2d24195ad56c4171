"""Scoring texts with a trained reward model (`tunelab score`).

A reward run folder holds a sequence classifier with one output (full weights, or a LoRA adapter whose saved
modules include the score head). Texts are scored as the training rows were built: text rows ended with EOS,
so an EOS is appended here too when the run used no chat template.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.inference.device import to_inference_device
from tunelab.outputs import load_base, read_run, training_params


def load_reward_model(path: str | Path) -> tuple[Any, Any, bool]:
    """(model, tokenizer, append_eos) from a reward run folder (adapter or full) or a classifier folder.

    The tokenizer truncates from the left to the run's block_size: the score is read at the last token, and the
    training rows kept the end of long prompts too."""
    from tunelab.models import load_tokenizer
    from tunelab.models.load import ModelSource, load_sequence_classifier

    folder = Path(path)
    if not folder.is_dir():
        raise TunelabError(f"{folder}: not a folder; expected a reward run folder (tunelab llm --trainer reward)")
    run = read_run(folder)
    if run and run.get("trainer") != "reward":
        raise TunelabError(f"{folder} was trained with --trainer {run.get('trainer')}, not reward: nothing to score")
    tokenizer = load_tokenizer(ModelSource(str(folder), str(folder)))
    if (folder / "adapter_config.json").is_file():
        from tunelab.models.peft import load_adapter

        base = load_base(folder, lambda source: load_sequence_classifier(source, 1))
        base.config.pad_token_id = tokenizer.pad_token_id
        model = load_adapter(base, folder)
    elif (folder / "config.json").is_file():
        model = load_sequence_classifier(ModelSource(str(folder), str(folder)), 1)
    else:
        raise TunelabError(f"{folder} holds no model: expected a tunelab reward run folder")
    model.config.pad_token_id = tokenizer.pad_token_id
    model = to_inference_device(model)
    trained_with = training_params(folder)
    if "block_size" in trained_with:
        tokenizer.model_max_length = trained_with["block_size"]
    tokenizer.truncation_side = "left"
    return model, tokenizer, run.get("template") is None


def score(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    append_eos: bool = True,
    batch_size: int = 8,
    add_special_tokens: bool = True,
) -> list[float]:
    """One reward per text (higher: preferred). `add_special_tokens` False for text a chat template rendered (its
    BOS is in it already, as in the training rows)."""
    import torch

    eos = tokenizer.eos_token if append_eos else None
    texts = [t + eos if eos and not t.endswith(eos) else t for t in texts]
    scores: list[float] = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            truncation=True,
            add_special_tokens=add_special_tokens,
        )
        batch = batch.to(model.device)
        with torch.no_grad():
            scores += model(**batch).logits.squeeze(-1).float().tolist()
    return scores
