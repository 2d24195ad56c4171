"""`tunelab export --format gguf-lora`: a LoRA adapter as llama.cpp's adapter file, judged by llama.cpp itself.

llama.cpp loads the base's GGUF and the adapter file on top (llama-cpp-python's lora_path) and computes the logits
transformers computes for the base with the PEFT adapter on: across families (Llama's reordered Q/K rows, Qwen2's
biases, Phi-3's fused projections, GPT-2's Conv1D), and with PEFT's per-module scales (rsLoRA, rank and alpha
patterns) folded in. What an adapter file cannot carry is refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import train_losses
from tests.test_export_families import family_model
from tunelab.cli import main
from tunelab.errors import TunelabError
from tunelab.inference.export import export_gguf
from tunelab.inference.generate import load_run
from tunelab.inference.gguf_adapter import export_adapter

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (scripts/install.sh)")

PROMPT = "Give three tips for staying healthy."
PLAIN = dict(r=8, lora_alpha=16)
PATTERNS = dict(r=8, lora_alpha=16, use_rslora=True, rank_pattern={"q_proj": 4}, alpha_pattern={"down_proj": 4})


def _base(family: str, tokenizer, folder: Path) -> Path:
    """The family's tiny model (weights large enough to tell tokens apart), saved with the test tokenizer."""
    family_model(family, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _adapter(base: Path, folder: Path, **lora) -> torch.nn.Module:
    """A PEFT adapter on `base` whose B factors are not zero (init_lora_weights False), as a trained one's are."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    lora = {"target_modules": "all-linear", "init_lora_weights": False, **lora}
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(**lora)).eval()
    with torch.no_grad():  # B at PEFT's random start is small: made larger, the adapter changes the logits clearly
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(8)
    model.save_pretrained(folder)
    return model


def _llama_cpp_logits(base_gguf: Path, adapter_gguf: Path | None, ids: list[int]) -> torch.Tensor:
    lora = {"lora_path": str(adapter_gguf)} if adapter_gguf else {}
    llm = llama_cpp.Llama(
        model_path=str(base_gguf), n_ctx=128, logits_all=True, verbose=False, n_threads=2, **lora
    )  # fmt: skip
    llm.eval(ids)
    scores = torch.tensor(llm.scores[: len(ids)])
    llm.close()
    return scores


@pytest.mark.parametrize(
    ("family", "lora"),
    [("llama", PLAIN), ("llama", PATTERNS), ("qwen2", PLAIN), ("phi3", PLAIN), ("gpt2", PLAIN)],
    ids=["llama", "llama-rslora-patterns", "qwen2", "phi3", "gpt2"],
)
def test_llama_cpp_applies_the_adapter_as_peft_does(tiny_tokenizer, tmp_path, family, lora):
    """The base's GGUF with the adapter file on top computes what the merged model's GGUF computes in llama.cpp (to
    float32 rounding), and both what transformers computes with the adapter on."""
    base = _base(family, tiny_tokenizer, tmp_path / "base")
    model = _adapter(base, tmp_path / "adapter", **lora)
    base_gguf = export_gguf(base, tmp_path / "base.gguf", "f32")
    adapter_gguf = export_adapter(tmp_path / "adapter", tmp_path / "adapter.gguf", "f32")
    ids = tiny_tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
        with model.disable_adapter():
            plain = model(torch.tensor([ids])).logits[0]
    model.merge_and_unload().save_pretrained(tmp_path / "merged")
    tiny_tokenizer.save_pretrained(tmp_path / "merged")
    merged_gguf = export_gguf(tmp_path / "merged", tmp_path / "merged.gguf", "f32")

    got = _llama_cpp_logits(base_gguf, adapter_gguf, ids)
    merged = _llama_cpp_logits(merged_gguf, None, ids)
    assert (expected - plain).abs().max() > 0.5  # the adapter moves the logits: a misplaced factor would show
    assert (got - merged).abs().max() < 1e-4 * merged.abs().max()  # the same weights, applied in two ways
    # transformers' logits, to llama.cpp's own sums: they differ most where the adapter makes activations large (the
    # rsLoRA case: 6% at the last position), for the merged file exactly as much
    assert (got - expected).abs().max() < 0.1 * expected.abs().max()
    # without the adapter file llama.cpp computes the base's logits: the file is what made the difference
    assert (_llama_cpp_logits(base_gguf, None, ids) - plain).abs().max() < 0.01 * plain.abs().max()


def test_a_lora_run_exports_its_adapter_from_the_cli(capsys, tiny_llama, tmp_path):
    """A run trained by tunelab, exported in f16 by the CLI: the file names the base's architecture and holds a
    pair of factors per adapted weight, and llama.cpp on the base's GGUF answers as the run does."""
    import gguf

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"Example {i}: the quick brown fox."}) + "\n" for i in range(16)))
    run = tmp_path / "run"
    code = main(
        [
            "llm", "--train", "--model", str(tiny_llama), "--data-path", str(data), "--trainer", "default",
            "--peft", "--lora-r", "8", "--lr", "1e-2", "--epochs", "4", "--batch-size", "8",
            "--gradient-accumulation", "1", "--block-size", "64", "--project-name", str(run),
            "--disable-gradient-checkpointing",
        ]
    )  # fmt: skip
    assert code == 0 and train_losses(run)
    output = tmp_path / "out" / "run-lora.gguf"
    args = ["export", "--model", str(run), "--format", "gguf-lora", "--output", str(output)]
    assert main(args) == 0
    assert f"tunelab: exported {output}" in capsys.readouterr().out
    reader = gguf.GGUFReader(output)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    assert (fields["general.type"], fields["general.architecture"], fields["adapter.type"]) == (
        "adapter",
        "llama",
        "lora",
    )
    assert fields["adapter.lora.alpha"] == 32.0
    names = {tensor.name for tensor in reader.tensors}
    assert len(names) == 2 * 2 * 7  # 2 layers x 7 linear layers x (lora_a, lora_b)
    assert {"blk.0.attn_q.weight.lora_a", "blk.1.ffn_down.weight.lora_b"} <= names
    assert {str(tensor.tensor_type.name) for tensor in reader.tensors} == {"F16"}

    model, tokenizer = load_run(run)
    ids = tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    base_gguf = export_gguf(tiny_llama, tmp_path / "base.gguf", "f32")
    got = _llama_cpp_logits(base_gguf, output, ids)
    assert (got - expected).abs().max() < 0.01 * expected.abs().max()


@pytest.mark.parametrize(
    ("case", "said"),
    [
        ("dora", "DoRA's magnitude vectors are not part of llama.cpp's adapter format"),
        ("modules_to_save", "it trained whole modules or token rows beside the adapter"),
        ("tied_head", "LoRA on lm_head, a head tied to the embeddings"),
        ("rope_scaling", "the run stretched its base's positions (rope_scaling)"),
        ("full", "holds full weights, not a LoRA adapter"),
        ("unconverted_pissa", "its factors start from pissa and were saved before conversion"),
        ("whole_tensor", "a whole tensor beside the LoRA factors"),
        ("classifier", "its adapter is for a SEQ_CLS model"),
        ("foreign_targets", "does not fit its base model"),
        ("dtype", "--format gguf-lora writes f32, f16, bf16, not 'q8_0'"),
    ],
)
def test_what_an_adapter_file_cannot_carry_is_refused_before_writing(tiny_llama, tmp_path, case, said):
    folder, dtype = tmp_path / "adapter", "f16"
    if case == "dora":
        _adapter(tiny_llama, folder, r=4, use_dora=True)
    elif case == "modules_to_save":
        _adapter(tiny_llama, folder, r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    elif case == "tied_head":
        _adapter(tiny_llama, folder, r=4, target_modules=["q_proj", "lm_head"])
    elif case == "rope_scaling":
        _adapter(tiny_llama, folder, r=4)
        record = {"base_model": str(tiny_llama), "trainer": "sft", "rope_scaling": {"rope_type": "linear"}}
        (folder / "tunelab_run.json").write_text(json.dumps(record))
    elif case == "full":
        folder = tiny_llama
    elif case in ("unconverted_pissa", "classifier", "foreign_targets"):
        _adapter(tiny_llama, folder, r=4)
        settings = json.loads((folder / "adapter_config.json").read_text())
        changed = {
            "unconverted_pissa": {"init_lora_weights": "pissa"},
            "classifier": {"task_type": "SEQ_CLS"},
            "foreign_targets": {"target_modules": ["query_key_value"]},
        }[case]
        (folder / "adapter_config.json").write_text(json.dumps({**settings, **changed}))
    elif case == "whole_tensor":
        from safetensors.torch import load_file, save_file

        _adapter(tiny_llama, folder, r=4)
        weights = load_file(folder / "adapter_model.safetensors")
        rows = json.loads((tiny_llama / "config.json").read_text())["vocab_size"]
        weights["base_model.model.model.embed_tokens.weight"] = torch.zeros(rows, 64)  # as for a resized vocabulary
        save_file(weights, folder / "adapter_model.safetensors")
    else:
        _adapter(tiny_llama, folder, r=4)
        dtype = "q8_0"
    output = tmp_path / "out.gguf"
    with pytest.raises(TunelabError, match="export: ") as raised:
        export_adapter(folder, output, dtype)
    assert said in str(raised.value)
    assert not list(tmp_path.glob("*out.gguf*"))
