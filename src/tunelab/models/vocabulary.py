"""New tokens for a run (`add_tokens`, `add_special_tokens`): added to the tokenizer, given rows in the model's
embeddings, and trained.

A token the tokenizer lacks (a tool-call or reasoning marker, a domain's own symbol) is otherwise split into
pieces the model has to learn to string together. Added, it is one id; the model gets a row for it in its input
embeddings and output head, started from the mean of the others (transformers' `mean_resizing`). Those rows must
then be trained, or the model can neither read nor write the token: full fine-tuning trains every row; with LoRA,
the listed tokens' rows are trained beside the adapter (PEFT's trainable tokens, `trainable_token_indices`),
saved in the adapter as a few vectors, not the whole embedding matrix. A listed token the tokenizer already has
(`<|im_end|>` on a base model that never wrote it) is not added again, but its rows are trained all the same.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("tunelab")


def add_tokens(tokenizer: Any, tokens: list[str], special: list[str]) -> list[int]:
    """Add the tokens the tokenizer lacks (`special`: as special tokens, never split and left out of decoded
    answers, as chat-template markers are); the ids of every listed token, in order, whose rows training updates."""
    listed = [*tokens, *special]
    if not listed:
        return []
    known = set(tokenizer.get_vocab())
    added = tokenizer.add_tokens([t for t in tokens if t not in known])
    added += tokenizer.add_tokens([t for t in special if t not in known], special_tokens=True)
    present = [t for t in listed if t in known]
    log.info(
        "tokens: %d added to the tokenizer (%d in all)%s; their embedding rows are trained",
        added,
        len(tokenizer),
        f", {len(present)} it had already ({', '.join(present[:5])})" if present else "",
    )
    return tokenizer.convert_tokens_to_ids(listed)


def fit_embeddings(model: Any, rows: int) -> None:
    """Give the model at least `rows` embedding rows (and output-head rows), the new ones started from the mean and
    spread of the others; nothing when it has them already (vocabularies are often padded)."""
    embedding = model.get_input_embeddings()
    if embedding is None or embedding.weight.shape[0] >= rows:
        return
    before = embedding.weight.shape[0]
    model.resize_token_embeddings(rows, mean_resizing=True)
    log.info("embeddings: grown from %d to %d rows, for the added tokens", before, rows)


def grow_vocabulary(config: Any, rows: int) -> None:
    """The model config as the model will be once `fit_embeddings` has given it `rows` rows."""
    for part in {id(c): c for c in (config, config.get_text_config())}.values():
        if isinstance(getattr(part, "vocab_size", None), int) and part.vocab_size < rows:
            part.vocab_size = rows


def listed_tokens(params: Any) -> list[str]:
    """The tokens a run adds (add_tokens, then add_special_tokens); none for a task without them."""
    return [*(getattr(params, "add_tokens", None) or []), *(getattr(params, "add_special_tokens", None) or [])]


def embedding_rows(model: Any) -> int:
    """How many rows the model's input embeddings have (the token ids it can take)."""
    return int(model.get_input_embeddings().weight.shape[0])


def trainable_tokens(model: Any, token_ids: list[int], modules_to_save: list[str]) -> dict[str, list[int]] | None:
    """PEFT's `trainable_token_indices` for these ids: the input embedding's rows, and the output head's where it
    has its own weight (a tied head shares the embedding's, and PEFT ties them). A module trained whole
    (`modules_to_save`) trains those rows already and is left out; None when nothing is left."""
    if not token_ids:
        return None
    ids = sorted(set(token_ids))
    names = {module: name.rsplit(".", 1)[-1] for name, module in model.named_modules() if name}
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    targets = [names.get(embedding)]
    if head is not None and head.weight is not embedding.weight:
        targets.append(names.get(head))
    chosen = {name: ids for name in targets if name and name not in modules_to_save}
    return chosen or None


def adapter_rows(folder: Path) -> int | None:
    """How many embedding rows the model had when the adapter in `folder` was trained, where it says: one past the
    highest token whose rows it trained (trainable_token_indices), or the rows of an embedding or head it saved
    whole (modules_to_save); None when it says nothing (then the base's own rows are the run's)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    indices = config.get("trainable_token_indices")
    if indices:
        return 1 + max(max(ids) for ids in (indices.values() if isinstance(indices, dict) else [indices]))
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    from safetensors import safe_open

    whole = ("embed_tokens.weight", "lm_head.weight", "wte.weight")
    with safe_open(str(weights), "pt") as saved:
        rows = [saved.get_slice(key).get_shape()[0] for key in saved.keys() if key.endswith(whole)]
    return max(rows, default=None)
