"""The tokenizer written into a GGUF file, in the two forms llama.cpp tokenizes with.

- Byte-level BPE (GPT-2 style: SmolLM, Llama 3, Qwen, Phi-4) as `tokenizer.ggml.model = gpt2`: the tokens, the
  merges and the pre-tokenizer's name (TextModel._set_vocab_gpt2 in llama.cpp's converter).
- SentencePiece-style BPE with byte fallback (Llama 2, Mistral v0.1, Gemma, Phi-3) as `llama`: pieces with `▁` for
  spaces, a score per piece (llama.cpp merges the adjacent pair whose joined piece scores highest), `<0xNN>` byte
  tokens. The scores come from `tokenizer.model` when the folder has one and `sentencepiece` is installed, as
  llama.cpp's converter takes them; otherwise from tokenizer.json's merges, whose order is the score order the
  SentencePiece model had (transformers' converter sorts them so), so the ranks give the same merges.

Special token ids, whether BOS/EOS are added, and the chat template go in through the gguf package's own
SpecialVocab, the reader llama.cpp's converter uses.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError

log = logging.getLogger("tunelab")

# What the backend tokenizer's pre-tokenizer looks like -> llama.cpp's name for it (tokenizer.ggml.pre), which
# tells llama.cpp how to split text before the merges. convert_hf_to_gguf.py recognises tokenizers by hashing
# their output on a test text; a tokenizer trained by the user matches no hash, so the shape is read instead.
_QWEN2_REGEX_START = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?"
_LLAMA3_REGEX_START = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _pre_tokenizer_name(backend: dict) -> str:
    pre = backend.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # GPT-2's split, which SmolLM's and tunelab's test tokenizers use
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"  # GPT-2's split after cutting numbers into single digits
    if kinds == ["Split", "ByteLevel"]:
        regex = steps[0].get("pattern", {}).get("Regex", "")
        if regex.startswith(_QWEN2_REGEX_START):
            return "qwen2"
        if regex.startswith(_LLAMA3_REGEX_START):
            return "llama-bpe"
    log.warning("export: unrecognised pre-tokenizer %s; llama.cpp will split text its default way", kinds)
    return "default"


def tokenizer_kind(backend: dict) -> str | None:
    """ "gpt2" (byte-level BPE), "llama" (SentencePiece-style BPE with byte fallback) or None (neither)."""
    model = backend.get("model", {})
    if model.get("type") != "BPE":
        return None
    if "ByteLevel" in json.dumps(backend.get("pre_tokenizer")) + json.dumps(backend.get("decoder")):
        return "gpt2"
    if model.get("byte_fallback"):
        return "llama"
    return None


def load_tokenizer(folder: Path) -> tuple[Any, dict]:
    """The tokenizer exactly as saved, and its backend's JSON; one TunelabError when it cannot be exported."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    # tokenizer.json exactly as saved: AutoTokenizer may pick a model-specific class that adds default special
    # tokens or swaps the pre-tokenizer (transformers 5 does both for Qwen2Tokenizer).
    loader = PreTrainedTokenizerFast if (folder / "tokenizer.json").is_file() else AutoTokenizer
    try:
        tokenizer = loader.from_pretrained(folder)
    except (ValueError, OSError) as error:
        raise TunelabError(f"export: {folder} has no usable tokenizer: {error}") from error
    backend = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    if tokenizer_kind(backend) is None:
        raise TunelabError(
            f"export: {folder}: GGUF export takes byte-level BPE tokenizers (SmolLM2, Llama 3, Qwen) and "
            "SentencePiece-style BPE with byte fallback (Llama 2, Mistral, Gemma, Phi-3); this one is "
            f"{backend.get('model', {}).get('type', 'of another kind')}"
        )
    return tokenizer, backend


def add_tokenizer(writer: Any, folder: Path, config: Any) -> int:
    """Write the folder's tokenizer; returns the vocabulary size written (one token per embedding row)."""
    import gguf

    tokenizer, backend = load_tokenizer(folder)
    kind = tokenizer_kind(backend)
    vocab = tokenizer.get_vocab()
    vocab_size = config.vocab_size  # llama.cpp checks the token count and the embedding rows agree
    added = tokenizer.added_tokens_decoder
    beyond = {index for index in vocab.values() if index >= vocab_size}
    # Added special tokens past the embedding rows are left out, as llama.cpp's converter leaves them out (with a
    # warning): Gemma 3's tokenizer has <image_soft_token> at 262144, its vocab_size. A model cannot read or write
    # them. Any other token past the rows is a tokenizer grown without resizing the embeddings.
    skipped = sorted(index for index in beyond if index in added and added[index].special)
    if beyond - set(skipped):
        raise TunelabError(
            f"export: {folder}: the tokenizer has ids up to {max(beyond - set(skipped))}, beyond the model's "
            f"vocab_size {vocab_size} (resize the embeddings when adding tokens)"
        )
    if skipped:
        log.warning(
            "export: left out special token(s) %s: their ids (%s) are beyond the model's vocab_size %d",
            ", ".join(added[index].content for index in skipped),
            ", ".join(map(str, skipped)),
            vocab_size,
        )
    by_id = {index: token for token, index in vocab.items()}
    scores = _piece_scores(folder, backend, vocab) if kind == "llama" else {}
    unk = backend.get("model", {}).get("unk_token")
    tokens, types, token_scores = [], [], []
    for index in range(vocab_size):
        if index not in by_id:  # the embedding matrix is often padded past the tokenizer
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            token_scores.append(-10000.0)
            continue
        token = added[index].content if index in added else by_id[index]
        tokens.append(token)
        token_scores.append(scores.get(token, -1000.0 if index in added else 0.0))
        if token == unk:
            types.append(gguf.TokenType.UNKNOWN)
        elif index in added:  # llama.cpp matches added tokens whole; CONTROL ones are specials
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        elif kind == "llama" and _BYTE_TOKEN.fullmatch(token):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model(kind)
    if kind == "gpt2":
        writer.add_tokenizer_pre(_pre_tokenizer_name(backend))
    else:
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(token_scores)
        writer.add_add_space_prefix(_adds_space_prefix(backend))
    writer.add_token_list(tokens)
    writer.add_token_types(types)

    # llama.cpp's own reader of tokenizer.json / tokenizer_config.json / config.json: merges (byte-level BPE only),
    # special token ids and the chat template, exactly as its converter takes them.
    special = gguf.SpecialVocab(folder, load_merges=kind == "gpt2", n_vocab=vocab_size)
    if special.chat_template is None and tokenizer.chat_template:
        special.chat_template = tokenizer.chat_template
    # Whether BOS/EOS are added is measured on the tokenizer itself, not guessed from its post-processor.
    with_specials = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    extra = len(with_specials) > len(plain)
    special.add_special_token["bos"] = extra and with_specials[0] == tokenizer.bos_token_id
    special.add_special_token["eos"] = extra and with_specials[-1] == tokenizer.eos_token_id
    eot = _turn_end_id(tokenizer, vocab_size)
    if eot is not None:
        special.special_token_ids.setdefault("eot", eot)
    special.add_to_gguf(writer, quiet=True)
    return vocab_size


def _turn_end_id(tokenizer: Any, vocab_size: int) -> int | None:
    """The chat template's turn-end token (`<|im_end|>` in ChatML) when it is one token other than EOS, else None.

    Written as tokenizer.ggml.eot_token_id: llama.cpp (and Ollama, LM Studio) end generation at EOS and at EOT, and
    a model fine-tuned on chats closes its answers with the turn end, often not its EOS (models/turns.py)."""
    from tunelab.models.turns import turn_end_token

    token = turn_end_token(tokenizer)[1]
    if token is None or token == tokenizer.eos_token_id or token >= vocab_size:
        return None
    return token


def _piece_scores(folder: Path, backend: dict, vocab: dict[str, int]) -> dict[str, float]:
    """A score per SentencePiece piece: higher merges first, as llama.cpp's SentencePiece tokenizer picks them."""
    model_file = folder / "tokenizer.model"
    if model_file.is_file():
        try:
            from sentencepiece import SentencePieceProcessor
        except ImportError:
            log.info("export: sentencepiece is not installed; piece scores come from tokenizer.json's merges")
        else:
            processor = SentencePieceProcessor()
            processor.LoadFromFile(str(model_file))
            return {processor.IdToPiece(i): processor.GetScore(i) for i in range(processor.vocab_size())}
    scores: dict[str, float] = {}
    for rank, merge in enumerate(backend["model"].get("merges", [])):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        scores.setdefault(left + right, -float(rank + 1))
    # A single character is never a merge's result, so its score is never read; a longer piece no merge makes
    # (HF's BPE never produces it) is ranked last, so llama.cpp does not prefer it either.
    return {token: scores.get(token, 0.0 if len(token) == 1 else -1e9) for token in vocab}


def _adds_space_prefix(backend: dict) -> bool:
    """Whether the tokenizer puts `▁` before the first word (Llama 2 does, Gemma does not)."""
    pre, normalizer = backend.get("pre_tokenizer") or {}, backend.get("normalizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for step in steps:
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always") in ("always", "first") or step.get("add_prefix_space", False)
    rules = normalizer.get("normalizers", [normalizer]) if normalizer.get("type") == "Sequence" else [normalizer]
    return any(rule.get("type") == "Prepend" and rule.get("prepend") == "▁" for rule in rules)
