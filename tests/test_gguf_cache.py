"""A GGUF model is dequantized once: the second load comes from the cache and is the same model and tokenizer."""

from __future__ import annotations

import os

import torch

from tunelab.inference.export import export_gguf
from tunelab.models import gguf_cache
from tunelab.models.load import load_causal_lm, load_tokenizer, resolve_model


def test_second_load_comes_from_the_cache_and_is_identical(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_GGUF_CACHE", str(tmp_path / "cache"))
    gguf = export_gguf(tiny_llama, tmp_path / "models" / "tiny.gguf", "f32")
    source = resolve_model(str(gguf))
    assert gguf_cache.cached(source, "model") is None

    first_model, first_tok = load_causal_lm(source), load_tokenizer(source)
    assert gguf_cache.cached(source, "model") is not None and gguf_cache.cached(source, "tokenizer") is not None
    second_model, second_tok = load_causal_lm(source), load_tokenizer(source)

    text = "Write a short poem about the sea. <|im_end|>"
    assert first_tok(text)["input_ids"] == second_tok(text)["input_ids"]
    assert second_tok.chat_template == first_tok.chat_template and second_tok.eos_token == first_tok.eos_token
    ids = torch.tensor([first_tok(text)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(second_model(ids).logits, first_model(ids).logits, rtol=0, atol=0)
    assert load_causal_lm(source, dtype=torch.bfloat16).dtype == torch.bfloat16  # the cache keeps float32

    # A changed file is a new entry: never the old weights.
    os.utime(gguf, ns=(gguf.stat().st_atime_ns, gguf.stat().st_mtime_ns + 10**9))
    assert gguf_cache.cached(resolve_model(str(gguf)), "model") is None


def test_cache_can_be_turned_off(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_GGUF_CACHE", "0")
    source = resolve_model(str(export_gguf(tiny_llama, tmp_path / "tiny.gguf", "f32")))
    load_causal_lm(source)
    assert gguf_cache.entry(source, "model") is None and gguf_cache.cached(source, "model") is None
