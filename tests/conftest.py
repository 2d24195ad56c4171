"""Shared test fixtures: tiny models built from a config, with a tokenizer trained here (no downloads)."""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The prepared-data cache of the tests' runs: their own, not the user's (~/.cache/tunelab/data), removed at the end;
# one per pytest-xdist worker, so that no test finds data another worker prepared a moment before.
if "TUNELAB_DATA_CACHE" not in os.environ or os.environ.get("TUNELAB_TEST_CACHE") == os.environ["TUNELAB_DATA_CACHE"]:
    os.environ["TUNELAB_DATA_CACHE"] = tempfile.mkdtemp(prefix="tunelab-test-data-cache-")
    os.environ["TUNELAB_TEST_CACHE"] = os.environ["TUNELAB_DATA_CACHE"]
    atexit.register(shutil.rmtree, os.environ["TUNELAB_DATA_CACHE"], ignore_errors=True)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on a machine's cores: each torch (and each run it starts) on its share, not all of them, or
    # the two would fight over every core.
    threads = max(1, (os.cpu_count() or 2) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_DATA = SHARED / "data"
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(autouse=True)
def restore_tunelab_logger():
    """main() installs a stderr handler bound to a test's capture: keep it from leaking into later tests."""
    logger = logging.getLogger("tunelab")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


@pytest.fixture(autouse=True)
def fresh_gradient_state():
    """accelerate keeps one GradientState per process: a training run ends it at its dataloader's end with the
    last batch's remainder, and `gather_for_metrics` outside a loop (a test scoring one batch through TRL) then
    drops that many rows. Each test starts from a fresh one, as each run of the CLI does."""
    from accelerate.state import GradientState

    GradientState._reset_state()
    yield


def needs_shared() -> pytest.MarkDecorator:
    return pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not beside the clone")


def _corpus() -> list[str]:
    """Text to train the test tokenizer on: the repo's own sample (present in every clone, unlike ../shared)."""
    sample = Path(__file__).resolve().parents[1] / "samples" / "alpaca.jsonl"
    texts = sample.read_text(encoding="utf-8").splitlines()
    texts.append("Below is an instruction that describes a task. ### Instruction: ### Input: ### Response:")
    return texts


def build_tokenizer(folder: Path, chat_template: str | None = CHATML):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", model_max_length=512
    )
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(folder)
    return fast


def build_sentencepiece_tokenizer(folder: Path):
    """A Llama-2-style tokenizer: BPE over `▁`-joined text with byte fallback (<0x00>..<0xFF> after the specials,
    as Llama 2's and Gemma's vocabularies begin), BOS added, `▁` before the first word."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    metaspace = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = metaspace
    learner.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=500, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {token: index for index, token in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for token in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = metaspace
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", model_max_length=512
    )
    fast.save_pretrained(folder)
    return fast


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def build_tiny_llama(folder: Path, tied: bool = True) -> Path:
    """A 2-layer Llama (random weights, seed 0) with a trained byte-level BPE tokenizer and a ChatML chat template,
    saved in `folder`; `tied` False gives its output head a weight of its own (Llama 3's)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(folder)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def resized_copy(model: Path, folder: Path, rows: int, added: float | None = None) -> Path:
    """A copy of the model folder `model` (its tokenizer files too) whose embeddings and head have `rows` rows: a
    vocabulary padded past its tokenizer (Qwen's), or one short of it. Rows added hold `added` where given."""
    import torch
    from transformers import AutoModelForCausalLM

    resized = AutoModelForCausalLM.from_pretrained(model)
    before = resized.get_input_embeddings().weight.shape[0]
    resized.resize_token_embeddings(rows, mean_resizing=False)
    if added is not None and rows > before:
        with torch.no_grad():
            resized.get_input_embeddings().weight[before:] = added
    resized.save_pretrained(folder)
    for file in model.glob("*"):
        if "token" in file.name or file.suffix == ".jinja":
            (folder / file.name).write_bytes(file.read_bytes())
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama (random weights) with a trained byte-level BPE tokenizer and a ChatML chat template."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 without a pad token or chat template (as openai-community/gpt2 is)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tok = build_tokenizer(folder, chat_template=None)
    config = GPT2Config(
        vocab_size=len(tok),
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_opt(tmp_path_factory) -> Path:
    """A 2-layer OPT: a causal LM tunelab trains but llama.cpp has no graph for (GGUF export refuses it)."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    folder = tmp_path_factory.mktemp("tiny-opt")
    tok = build_tokenizer(folder)
    config = OPTConfig(
        vocab_size=len(tok), hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=64, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    OPTForCausalLM(config).save_pretrained(folder)
    return folder


def read_metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def train_losses(folder: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(folder) if "loss" in r]


def learn_by_heart(model: Path, data: Path, run: Path, chat_template: str, block_size: int) -> Path:
    """Train `model` on `data` until it answers as the data does (a full fine-tuning: the tiny models' frozen heads
    are too small for LoRA alone to learn an answer by heart); the run folder."""
    from tunelab.cli import main

    code = main(
        [
            "llm", "--train", "--model", str(model), "--data-path", str(data), "--trainer", "sft",
            "--chat-template", chat_template, "--lr", "3e-3", "--epochs", "60", "--batch-size", "8",
            "--gradient-accumulation", "1", "--block-size", str(block_size), "--project-name", str(run),
            "--disable-gradient-checkpointing", "--logging-steps", "40",
        ]
    )  # fmt: skip
    assert code == 0
    return run


@pytest.fixture(scope="session")
def reasoner(tiny_llama, tmp_path_factory):
    """A run that learned to reason before it answers (reasoning_content rows, through tunelab's ChatML)."""
    folder = tmp_path_factory.mktemp("reasoner")
    chat = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Two and two make four."},
    ]
    data = folder / "reasoning.jsonl"
    data.write_text((json.dumps({"messages": chat}) + "\n") * 16)
    return learn_by_heart(tiny_llama, data, folder / "run", "chatml", block_size=128)
