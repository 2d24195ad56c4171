"""Every family of the model matrix that llama.cpp runs, judged by llama.cpp itself.

For each family (tests/model_matrix.py's configs: tied and untied heads, QK-norm, Gemma's `1 + w` norms,
soft-capping and sliding windows, GPT-2's Conv1D and learned positions, Granite's multipliers, SmolLM3's NoPE
layers, Qwen3-MoE's experts), a tiny random model is exported and loaded in llama.cpp (llama-cpp-python): its
logits at every position equal transformers' (f32 file), and greedy decoding gives the same tokens (f16 file).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.model_matrix import family_configs
from tunelab.inference.export import export_gguf

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (scripts/install.sh)")

PROMPTS = ["Give three tips for staying healthy.", "Name 3 colors of the rainbow and"]
FAMILIES = [name for name in family_configs(8, 0, 1) if name != "llama (llama3 RoPE scaling)"]  # test_export's
NEW_TOKENS = 8


def family_model(name: str, tokenizer):
    """The family's tiny model with weights large enough (initializer_range 0.3) that tokens are not near-ties,
    and norms and biases moved off their initial ones and zeros so a misplaced one shows."""
    from transformers import AutoModelForCausalLM

    config = family_configs(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)[name]
    config.initializer_range = 0.3
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("bias"):
                param.normal_(std=0.5)
            elif "norm" in param_name or ".ln_" in param_name:
                # Gemma's norms multiply by (1 + w) and start at w = 0; the others by w from 1.
                low = -0.5 if config.model_type.startswith("gemma") else 0.5
                param.uniform_(low, low + 1.0)
    return model


def _llama_cpp(path):
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2)


def _greedy(llm, ids: list[int], eos: int) -> list[int]:
    """Argmax decoding in llama.cpp, up to NEW_TOKENS tokens or the end-of-sequence token."""
    llm.reset()
    llm.eval(ids)
    new: list[int] = []
    while len(new) < NEW_TOKENS and (not new or new[-1] != eos):
        new.append(int(torch.tensor(llm.scores[llm.n_tokens - 1]).argmax()))
        llm.eval(new[-1:])
    return new


@pytest.fixture(scope="module")
def exported(tiny_tokenizer, tmp_path_factory):
    """name -> (model, f32 file, f16 file), built once per family."""
    made = {}

    def make(name: str):
        if name not in made:
            model = family_model(name, tiny_tokenizer)
            folder = tmp_path_factory.mktemp("family") / "tiny"  # a folder named after the family can trip
            model.save_pretrained(folder)  # llama.cpp's name-based token rules (phi3)
            tiny_tokenizer.save_pretrained(folder)
            made[name] = (model, export_gguf(folder, folder.parent / "f32.gguf", "f32"),
                          export_gguf(folder, folder.parent / "f16.gguf", "f16"))  # fmt: skip
        return made[name]

    return make


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_computes_transformers_logits(exported, tiny_tokenizer, family):
    model, f32, _ = exported(family)
    llm = _llama_cpp(f32)
    for prompt in PROMPTS:
        ids = tiny_tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0].float()
        llm.reset()
        llm.eval(ids)
        got = torch.tensor(llm.scores[: len(ids)])
        error = (got - expected).abs().max()
        assert error < 0.01 * expected.abs().max(), prompt
        # The same next token wherever transformers' choice is not a near-tie (llama.cpp's GELU is a table in
        # f16, so logits differ by ~1e-3 on GPT-2 and Gemma).
        top2 = expected.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * error
        assert clear.float().mean() > 0.5, prompt  # the check covers most positions
        assert torch.equal(got.argmax(-1)[clear], expected.argmax(-1)[clear]), prompt
    llm.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_greedy_tokens_equal_transformers(exported, tiny_tokenizer, family):
    model, _, f16 = exported(family)
    llm = _llama_cpp(f16)
    for prompt in PROMPTS:
        ids = tiny_tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.eos_token_id,
            )  # fmt: skip
        assert _greedy(llm, ids, tiny_tokenizer.eos_token_id) == out[0, len(ids) :].tolist(), prompt
    llm.close()


SENTENCEPIECE_TEXTS = [
    "Give three tips for staying healthy.",
    # (not a leading space: transformers' Metaspace then adds no `▁` of its own, SentencePiece and llama.cpp do)
    "two  spaces inside, tabs\tand\nnew lines",
    "Unicode beyond the vocabulary: café, 東京, 🙂 — bytes then.",
    "Below is an instruction that describes a task. ### Response:",
]


def test_sentencepiece_tokenizer_tokenizes_and_runs_in_llama_cpp(tmp_path):
    """A Llama-2-style tokenizer (SentencePiece BPE, byte fallback) is written as llama.cpp's `llama` tokenizer:
    llama.cpp splits text into the same ids as transformers, bytes included, decodes them back, and the model's
    logits on them agree."""
    from tests.conftest import build_sentencepiece_tokenizer

    folder = tmp_path / "tiny"
    tokenizer = build_sentencepiece_tokenizer(folder)
    model = family_model("llama", tokenizer)
    model.save_pretrained(folder)
    path = export_gguf(folder, tmp_path / "spm.gguf", "f32")
    llm = _llama_cpp(path)
    for text in SENTENCEPIECE_TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=True) == ids, text
        assert llm.detokenize(ids).decode() == text, text  # the wrapper drops the prefix space after BOS
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(SENTENCEPIECE_TEXTS[2])["input_ids"])
    assert any(piece.startswith("<0x") for piece in pieces)  # byte fallback was exercised
    ids = tokenizer(SENTENCEPIECE_TEXTS[0])["input_ids"]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    llm.eval(ids)
    assert (torch.tensor(llm.scores[: len(ids)]) - expected).abs().max() < 0.01 * expected.abs().max()
    llm.close()


@pytest.mark.parametrize("scores_from", ["tokenizer.model", "tokenizer.json merges"])
def test_a_real_sentencepiece_model_tokenizes_the_same_in_llama_cpp(tmp_path, scores_from):
    """A SentencePiece BPE model trained here (as Llama 2's, Mistral's and Gemma's are), its transformers conversion
    saved as a run folder saves it: llama.cpp splits text exactly as SentencePiece itself does, whether the piece
    scores come from tokenizer.model (sentencepiece installed) or from tokenizer.json's merges (transformers 5
    saves no tokenizer.model)."""
    import shutil

    spm = pytest.importorskip("sentencepiece")
    from transformers import AutoTokenizer

    from tests.conftest import _corpus

    source = tmp_path / "sp"
    source.mkdir()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_prefix=str(source / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, remove_extra_whitespaces=False,
        split_digits=True, normalization_rule_name="identity", minloglevel=2,  # as Llama 2 (no NFKC)
    )  # fmt: skip
    (source / "tokenizer_config.json").write_text(
        json.dumps(
            {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
        ),
    )
    tokenizer = AutoTokenizer.from_pretrained(source)  # transformers converts the SentencePiece model
    folder = tmp_path / "tiny"
    tokenizer.save_pretrained(folder)
    if scores_from == "tokenizer.model":
        shutil.copy(source / "tokenizer.model", folder)
    family_model("llama", tokenizer).save_pretrained(folder)
    llm = _llama_cpp(export_gguf(folder, tmp_path / "sp.gguf", "f16"))
    processor = spm.SentencePieceProcessor(model_file=str(source / "tokenizer.model"))
    for text in SENTENCEPIECE_TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False) == processor.encode(text), text
    llm.close()
