"""New tokens for a run (`add_tokens`, `add_special_tokens`): added to the tokenizer, given rows in the model's
embeddings, and trained.

A token the tokenizer lacks (a tool-call or reasoning marker, a domain's own symbol) is otherwise split into
pieces the model has to learn to string together. Added, it is one id; the model gets a row for it in its input
embeddings and output head, started at the mean of the existing tokens' rows (a vocabulary padded with spare rows,
as Qwen's is, gives the new ids spare rows, started the same way). Those rows must then be trained, or the model
can neither read nor write the token: full fine-tuning trains every row; with LoRA, the listed tokens' rows are
trained beside the adapter (PEFT's trainable tokens, `trainable_token_indices`), saved in the adapter as a few
vectors, not the whole embedding matrix. A listed token the tokenizer already has (`<|im_end|>` on a base model
that never wrote it) is not added again, but its rows are trained all the same.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError

log = logging.getLogger("tunelab")


def add_tokens(tokenizer: Any, tokens: list[str], special: list[str]) -> list[int]:
    """Add the tokens the tokenizer lacks (`special`: as special tokens, never split and left out of decoded text:
    answers, evaluation samples, what GRPO's rewards read); the ids of those it added."""
    if not tokens and not special:
        return []
    known = set(tokenizer.get_vocab())
    before = len(tokenizer)
    tokenizer.add_tokens([t for t in tokens if t not in known])
    tokenizer.add_tokens([t for t in special if t not in known], special_tokens=True)
    present = [t for t in [*tokens, *special] if t in known]
    specials = set(special_tokens(tokenizer).values())
    for token in (t for t in special if t in known and t not in specials):
        log.warning("add_special_tokens: the tokenizer has %r already, as an ordinary token; it stays one", token)
    log.info(
        "tokens: %d added to the tokenizer (%d in all)%s; their embedding rows are trained",
        len(tokenizer) - before,
        len(tokenizer),
        f", {len(present)} it had already ({', '.join(present[:5])})" if present else "",
    )
    return list(range(before, len(tokenizer)))


def special_tokens(tokenizer: Any) -> dict[int, str]:
    """The tokens decoding skips as special, by id: the tokenizer's own (bos, eos, pad...) and any added token
    marked special."""
    found = {tokenizer.convert_tokens_to_ids(token): str(token) for token in tokenizer.all_special_tokens}
    found |= {i: str(token) for i, token in tokenizer.added_tokens_decoder.items() if getattr(token, "special", False)}
    return found


def fit_embeddings(model: Any, rows: int, new_ids: list[int] | None = None) -> None:
    """Give the model at least `rows` embedding rows (and output-head rows). The rows grown, and `new_ids` (the
    tokens just added, which in a padded vocabulary take spare rows), start at the mean of the rows before them:
    the same start in training, in a reference model and when a run's base is grown to load its adapter."""
    import torch

    embedding = model.get_input_embeddings()
    if embedding is None:
        return
    before = embedding.weight.shape[0]
    if before < rows:
        model.resize_token_embeddings(rows, mean_resizing=False)  # the rows are set below, not drawn
        log.info("embeddings: grown from %d to %d rows, for the added tokens", before, rows)
    ids = sorted({*(new_ids or []), *range(before, rows)})
    if not ids:
        return
    index = torch.tensor(ids)
    with torch.no_grad():
        for module in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
            weight = getattr(module, "weight", None)
            if weight is not None and weight.shape[0] >= rows:
                weight[index] = weight[: ids[0]].mean(0, dtype=torch.float32).to(weight.dtype)


def grow_vocabulary(config: Any, rows: int) -> None:
    """The model config as the model will be once `fit_embeddings` has given it `rows` rows."""
    for part in {id(c): c for c in (config, config.get_text_config())}.values():
        if isinstance(getattr(part, "vocab_size", None), int) and part.vocab_size < rows:
            part.vocab_size = rows


def embedding_rows(model: Any) -> int:
    """How many rows the model's input embeddings have (the token ids it takes), read off the base layer under
    PEFT's trainable-tokens wrapper (whose own `weight` is rebuilt, whole, at each read)."""
    embedding = model.get_input_embeddings()
    adapter = getattr(embedding, "token_adapter", None)
    return int((adapter.get_base_layer() if adapter is not None else embedding).weight.shape[0])


def trainable_tokens(
    model: Any, token_ids: list[int], saved_whole: list[str], lora_targets: str | list[str]
) -> dict[str, list[int]] | None:
    """PEFT's `trainable_token_indices` for these ids: the input embedding's rows, and the output head's where it
    has its own weight (a tied head shares the embedding's, and PEFT ties them). A module trained whole
    (`saved_whole`: modules_to_save) trains those rows already and is left out; None when nothing is left. Refused
    in one line: a module LoRA adapts (PEFT trains no rows of it, and would save none), a head with a bias
    (Phi-2's: PEFT's trainable tokens project without it)."""
    if not token_ids:
        return None
    ids = sorted(set(token_ids))
    names = {module: name.rsplit(".", 1)[-1] for name, module in model.named_modules() if name}
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    targets = [names.get(embedding)]
    if head is not None and head.weight is not embedding.weight:
        targets.append(names.get(head))
    whole = {name.rsplit(".", 1)[-1] for name in saved_whole}
    targeted = {name.rsplit(".", 1)[-1] for name in lora_targets} if isinstance(lora_targets, list) else set()
    chosen = {name: ids for name in targets if name and name not in whole}
    adapted = sorted(name for name in chosen if name in targeted)
    if adapted:
        raise TunelabError(
            f"add_tokens with LoRA on {adapted[0]}: PEFT cannot train the added tokens' rows of a module LoRA "
            f"adapts; leave {adapted[0]} out of target_modules, or add modules_to_save: {adapted[0]} to train it whole"
        )
    if head is not None and names.get(head) in chosen and getattr(head, "bias", None) is not None:
        raise TunelabError(
            f"add_tokens with LoRA: this model's output head ({names[head]}) has a bias, which PEFT's trainable "
            f"tokens leave out; add modules_to_save: {names[head]} to train the head whole"
        )
    return chosen or None


def adapter_rows(folder: Path, base: Any) -> int | None:
    """How many embedding rows the model had when the adapter in `folder` was trained, where it says: one past the
    highest token whose rows it trained (trainable_token_indices), or the rows of the base's embedding or head
    saved whole (modules_to_save); None when it says nothing (then the base's own rows are the run's)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    indices = config.get("trainable_token_indices")
    if indices:
        return 1 + max(max(ids) for ids in (indices.values() if isinstance(indices, dict) else [indices]))
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    from safetensors import safe_open

    modules = (base.get_input_embeddings(), base.get_output_embeddings())
    whole = tuple(f"{name.rsplit('.', 1)[-1]}.weight" for name, module in base.named_modules() if module in modules)
    with safe_open(str(weights), "pt") as saved:
        rows = [saved.get_slice(key).get_shape()[0] for key in saved.keys() if whole and key.endswith(whole)]
    return max(rows, default=None)
