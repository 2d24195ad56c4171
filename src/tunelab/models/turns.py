"""What ends a model's turn, so that generation stops where training taught the model to stop.

A chat template closes each assistant answer with its own marker: ChatML's `<|im_end|>`, Llama 3's `<|eot_id|>`,
Gemma's `<end_of_turn>`. Training puts the loss on that marker, so the fine-tuned model ends its answers with it;
but a base model's end-of-sequence token is often another one (Qwen2.5's base ends sequences with `<|endoftext|>`,
and a model given tunelab's ChatML has EOS `</s>`), and generating only until EOS runs on into an invented next
turn. The marker is found by rendering one short chat through the template and reading what follows the answer.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("tunelab")

_ANSWER = "TUNELABANSWERMARK"


def turn_end_marker(tokenizer: Any) -> str | None:
    """The text the tokenizer's chat template puts after an assistant answer (its special token when it holds
    one, else the text stripped), or None: no template, nothing after the answer, or a template that cannot
    render a plain user/assistant exchange."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _ANSWER}]
    try:
        text = tokenizer.apply_chat_template(chat, tokenize=False)
    except Exception:  # noqa: BLE001 - jinja2's errors, or a template's raise_exception: no marker to read
        return None
    if not isinstance(text, str) or text.count(_ANSWER) != 1:
        return None
    after = text.split(_ANSWER)[1]
    specials = {str(t) for t in tokenizer.all_special_tokens} | set(tokenizer.get_added_vocab())
    found = [token for token in specials if token.strip() and token in after]
    if found:  # the first one in the text: `<|im_end|>` in "<|im_end|>\n", not a BOS the next turn may start with
        return min(found, key=lambda token: (after.index(token), -len(token)))
    return after.strip() or None


def turn_end_token(tokenizer: Any) -> tuple[str | None, int | None]:
    """(the turn-end marker, its token id when it is one token, else None)."""
    marker = turn_end_marker(tokenizer)
    if marker is None:
        return None, None
    encoded = tokenizer(marker, add_special_tokens=False)["input_ids"]
    return marker, encoded[0] if len(encoded) == 1 else None


def turn_end(tokenizer: Any, model: Any = None) -> tuple[list[int], list[str]]:
    """(token ids that end generation, stop strings): the model's own end-of-sequence ids, the tokenizer's EOS,
    and the template's turn-end marker: as an id when it is one token, else as text to stop at."""
    ids: list[int] = []
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in eos if isinstance(eos, list) else [eos]:
        if value is not None and value not in ids:
            ids.append(int(value))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    marker, token = turn_end_token(tokenizer)
    if token is not None:
        if token not in ids:
            ids.append(token)
        return ids, []
    return ids, [marker] if marker is not None else []


def mark_turn_end(model: Any, tokenizer: Any) -> None:
    """Write the template's turn-end token into the model's generation config (beside its EOS) before a full
    model is saved, so that transformers' generate, vLLM and TGI stop at it too. A marker of several tokens cannot
    be written there: said once, since only tunelab's own chat, generate and serve stop at it."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return
    ids, strings = turn_end(tokenizer, model)
    if strings:
        log.warning(
            "the chat template ends a turn with %r, which this tokenizer splits into several tokens: tunelab's chat, "
            "generate and serve stop at it, other runtimes may run on past it (give them it as a stop string)",
            strings[0],
        )
    if len(ids) > 1:
        config.eos_token_id = ids
    elif ids:
        config.eos_token_id = ids[0]
