"""Freeze training (models/freeze.py): a full fine-tuning of some layers or parameters, the rest frozen, as
LLaMA-Factory's finetuning_type freeze and Axolotl's unfrozen_parameters. Only the chosen weights change, and their
gradients are a full fine-tuning's; under mixed precision the frozen weights stay in the half type; a name that
matches nothing is one line before any weight loads."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import train_losses
from tunelab.cli import main
from tunelab.config.llm import LLMParams
from tunelab.models import load_model, resolve_model

DATA = Path(__file__).resolve().parents[1] / "samples" / "alpaca.jsonl"
SMALL = ["--batch-size", "4", "--gradient-accumulation", "1", "--block-size", "128", "--model-max-length", "256"]


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    assert set(before) == set(after)
    return {name for name in before if not torch.equal(before[name], after[name].to(before[name].dtype))}


def test_only_the_chosen_weights_train_and_the_model_reloads(tiny_llama, tmp_path):
    """The last layer's MLP and the final norm (LLaMA-Factory's settings) train, everything else stays bit-equal;
    the loss falls and the saved model is an ordinary full model that generates."""
    run = tmp_path / "run"
    argv = ["llm", "--train", "--model", str(tiny_llama), "--data-path", str(DATA), "--trainer", "sft"]
    argv += ["--freeze-trainable-layers", "1", "--freeze-trainable-modules", "mlp", "--freeze-extra-modules", "norm"]
    argv += ["--lr", "1e-2", "--max-steps", "16", "--logging-steps", "1", "--project-name", str(run), *SMALL]
    assert main(argv) == 0
    losses = train_losses(run)
    assert statistics.mean(losses[-4:]) < statistics.mean(losses[:4])
    before, after = load_file(tiny_llama / "model.safetensors"), load_file(run / "model.safetensors")
    trained = {f"model.layers.1.mlp.{p}_proj.weight" for p in ("gate", "up", "down")} | {"model.norm.weight"}
    assert _changed(before, after) == trained
    model = AutoModelForCausalLM.from_pretrained(run)
    tokenizer = AutoTokenizer.from_pretrained(run)
    inputs = tokenizer("Write a function", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def _batch(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    ids = tokenizer(["The sea is wide and deep, and the sky above it is wider."], return_tensors="pt")
    return {**ids, "labels": ids["input_ids"]}


def test_gradients_are_a_full_fine_tuning_s_for_the_chosen_parameters(tiny_llama):
    """Axolotl's regexes (the first layer's q_proj, the embeddings the head is tied to): the same loss as the full
    model's, the same gradients for what trains, none for the rest."""
    settings = dict(model=str(tiny_llama), trainer="sft", fused_ops=True)
    full = load_model(resolve_model(str(tiny_llama)), LLMParams(**settings))
    freezing = LLMParams(**settings, unfrozen_parameters=[r"model\.layers\.0\.self_attn\.q_proj", "^lm_head"])
    partial = load_model(resolve_model(str(tiny_llama)), freezing)
    batch = _batch(tiny_llama)
    losses = [model(**batch).loss for model in (full, partial)]
    for loss in losses:
        loss.backward()
    assert torch.equal(losses[0], losses[1])
    grads = dict(full.named_parameters())
    trained = {name for name, p in partial.named_parameters() if p.grad is not None}
    assert trained == {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"}  # (lm_head is tied)
    for name, p in partial.named_parameters():
        assert p.requires_grad == (name in trained)
        if name in trained:
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=0, atol=0)


def test_frozen_weights_stay_in_the_half_type_under_mixed_precision(tiny_llama, tmp_path):
    """bf16: the frozen layers as a LoRA run's base (half the memory), the trained ones in fp32 for the optimizer;
    a run trains, and its dry run counts the frozen weights at 2 bytes."""
    params = LLMParams(model=str(tiny_llama), trainer="sft", mixed_precision="bf16", freeze_trainable_layers=-1)
    model = load_model(resolve_model(str(tiny_llama)), params)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert {dtypes[n] for n in dtypes if n.startswith("model.layers.0.")} == {torch.float32}
    assert {dtypes[n] for n in dtypes if not n.startswith("model.layers.0.")} == {torch.bfloat16}
    run = tmp_path / "run"
    argv = ["llm", "--train", "--model", str(tiny_llama), "--data-path", str(DATA), "--trainer", "sft"]
    argv += ["--freeze-trainable-layers", "-1", "--mixed-precision", "bf16", "--max-steps", "2"]
    assert main([*argv, "--project-name", str(run), *SMALL]) == 0
    assert (run / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--freeze-trainable-layers", "1", "--freeze-trainable-modules", "mlpp"],
         "freeze_trainable_modules: a decoder layer has no module 'mlpp'; it has input_layernorm, mlp, "
         "post_attention_layernorm, self_attn (or all)"),
        (["--freeze-trainable-layers", "3"], "freeze_trainable_layers: 3 layers of a model of 2: give 1 to 2"),
        (["--freeze-trainable-layers", "1", "--freeze-extra-modules", "head"],
         "freeze_extra_modules: the model has no module 'head' outside its decoder layers; it has "),
        (["--unfrozen-parameters", "^model.layer.1 ^lm_head"], "unfrozen_parameters: '^model.layer.1' matches no"),
        (["--unfrozen-parameters", "model.layers.(1"], "unfrozen_parameters: 'model.layers.(1' is not a regular"),
        (["--freeze-trainable-layers", "1", "--peft"], "freeze_trainable_layers trains some of the weights"),
        (["--freeze-extra-modules", "norm"], "freeze_extra_modules is read with freeze_trainable_layers or"),
        (["--freeze-trainable-layers", "1", "--add-tokens", "<tool>"],
         "add_tokens with freeze training: the added tokens' rows would stay as they start unless the input "
         "embeddings train: add embed_tokens to freeze_extra_modules"),
    ],
    ids=["module", "layers", "extra", "regex-matches-nothing", "bad-regex", "peft", "extra-alone", "added-tokens"],
)  # fmt: skip
def test_settings_that_name_nothing_are_one_line_before_anything_loads(tiny_llama, tmp_path, capsys, flags, message):
    argv = ["llm", "--train", "--model", str(tiny_llama), "--data-path", str(DATA), "--trainer", "sft", *flags]
    assert main([*argv, "--project-name", str(tmp_path / "run"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "run").exists()


def test_the_dry_run_says_what_trains_and_counts_it_in_the_memory_estimate(tiny_llama, tmp_path, capsys):
    import tunelab

    argv = ["llm", "--dry-run", "--model", str(tiny_llama), "--data-path", str(DATA), "--trainer", "sft", *SMALL]
    assert main([*argv, "--project-name", str(tmp_path / "run"), "--freeze-trainable-layers", "1"]) == 0
    assert (
        "train (the rest frozen); the decoder layers before layer 1 of 2 keep no activations"
        in capsys.readouterr().out
    )
    settings = dict(model=str(tiny_llama), data_path=str(DATA), trainer="sft", project_name=str(tmp_path / "run"))
    whole = tunelab.plan(settings).memory
    frozen = tunelab.plan(settings, freeze_trainable_layers=1).memory
    last_layer = sum(p.numel() for n, p in AutoModelForCausalLM.from_pretrained(tiny_llama).named_parameters()
                     if n.startswith("model.layers.1."))  # fmt: skip
    assert frozen.optimizer == 8 * last_layer and frozen.gradients == 4 * last_layer  # AdamW's 2 fp32 states
    assert frozen.activations < whole.activations and frozen.weights == whole.weights
