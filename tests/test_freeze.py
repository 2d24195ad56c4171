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
    argv += ["--freeze-trainable-layers", "-1", "--mixed-precision", "bf16", "--max-steps", "4", "--lr", "1e-2"]
    assert main([*argv, "--project-name", str(run), *SMALL]) == 0
    before = {k: v.to(torch.bfloat16) for k, v in load_file(tiny_llama / "model.safetensors").items()}
    after = load_file(run / "model.safetensors")  # the frozen weights as loaded (bf16), the trained ones fp32
    assert {after[k].dtype for k in after if k.startswith("model.layers.0.")} == {torch.float32}
    assert _changed(before, after) == {k for k in after if k.startswith("model.layers.0.")}
    reloaded = AutoModelForCausalLM.from_pretrained(run, dtype=torch.float32)
    assert reloaded(torch.tensor([[1, 2, 3]])).logits.isfinite().all()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--freeze-trainable-layers", "1", "--freeze-trainable-modules", "mlpp"],
         "freeze_trainable_modules: the chosen decoder layer has no module 'mlpp'; it has input_layernorm, mlp, "
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
    assert "train (the rest frozen); the layers before layer 1 of 2 keep no activations" in capsys.readouterr().out
    patterns = r"^model\.layers\.0\.mlp\.down_proj ^model\.norm"  # Axolotl's regexes, on the command line
    assert main([*argv, "--project-name", str(tmp_path / "run"), "--unfrozen-parameters", patterns]) == 0
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    down, norm = model.model.layers[0].mlp.down_proj.weight.numel(), model.model.norm.weight.numel()
    assert f"freeze training: {down + norm:,} of " in capsys.readouterr().out
    settings = dict(model=str(tiny_llama), data_path=str(DATA), trainer="sft", project_name=str(tmp_path / "run"))
    whole = tunelab.plan(settings).memory
    frozen = tunelab.plan(settings, freeze_trainable_layers=1).memory
    last_layer = sum(p.numel() for n, p in AutoModelForCausalLM.from_pretrained(tiny_llama).named_parameters()
                     if n.startswith("model.layers.1."))  # fmt: skip
    assert frozen.optimizer == 8 * last_layer and frozen.gradients == 4 * last_layer  # AdamW's 2 fp32 states
    assert frozen.activations < whole.activations and frozen.weights == whole.weights


def _skeleton(model_type: str, **sizes):
    from transformers import AutoConfig

    from tunelab.models.checks import skeleton

    config = AutoConfig.for_model(model_type)
    text = config.get_text_config()
    for key, value in sizes.items():
        setattr(text, key, value)
    return skeleton(config, "causal_lm")


def _choose(model, **settings):
    from tunelab.models.freeze import trainable_names

    return trainable_names(model, LLMParams(trainer="sft", **settings))


def test_layers_are_chosen_by_their_whole_index_and_each_chosen_layer_s_modules():
    """Layer 1 is not layer 10; in a model whose layers differ (Qwen3-Next: linear attention in three of four), a
    module counts where a chosen layer has it, and the refusal names what the chosen layers have."""
    llama = _skeleton("llama", num_hidden_layers=12, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=100)  # fmt: skip
    first_two = {n.split(".")[2] for n in _choose(llama, freeze_trainable_layers=-2).names if ".layers." in n}
    last_two = {n.split(".")[2] for n in _choose(llama, freeze_trainable_layers=2).names if ".layers." in n}
    assert (first_two, last_two) == ({"0", "1"}, {"10", "11"})

    layer_types = ["linear_attention", "linear_attention", "linear_attention", "full_attention"]
    qwen = _skeleton("qwen3_next", num_hidden_layers=4, layer_types=layer_types, hidden_size=32, intermediate_size=64,
                     moe_intermediate_size=16, num_experts=4, num_attention_heads=2, num_key_value_heads=1,
                     head_dim=16, vocab_size=100, linear_num_value_heads=2, linear_num_key_heads=1,
                     linear_key_head_dim=8, linear_value_head_dim=8)  # fmt: skip
    choice = _choose(qwen, freeze_trainable_layers=1, freeze_trainable_modules="self_attn")
    assert choice.names and all(n.startswith("model.layers.3.self_attn.") for n in choice.names)
    with pytest.raises(Exception, match=r"the chosen decoder layer has no module 'linear_attn'; it has .*self_attn"):
        _choose(qwen, freeze_trainable_layers=1, freeze_trainable_modules="linear_attn")


def test_a_multimodal_model_trains_its_language_side_only():
    """Gemma 3 (a vision tower beside the language model): freeze_extra_modules reads the language model's modules
    (its final norm, not the tower's norms), and parameters the loss never reaches are refused."""
    from tunelab.errors import ConfigError

    gemma = _skeleton("gemma3", num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, vocab_size=300)  # fmt: skip
    choice = _choose(gemma, freeze_trainable_layers=1, freeze_extra_modules="norm")
    assert "model.language_model.norm.weight" in choice.names
    assert not any("vision" in n for n in choice.names) and choice.first_layer == 1
    with pytest.raises(
        ConfigError, match=r"the chosen parameters .* are all in model\.vision_tower, off the language model's path"
    ):
        _choose(gemma, unfrozen_parameters=["model.vision_tower"])


def test_regexes_alone_need_no_list_of_layers():
    """Axolotl's unfrozen_parameters name parameters: a model whose layers are not found from its config still
    trains them (every layer counted as keeping its activations); the layer settings say they cannot."""
    from tunelab.errors import ConfigError

    llama = _skeleton("llama", num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=100)  # fmt: skip
    llama.config.num_hidden_layers = 5  # (a config that does not describe the layers)
    choice = _choose(llama, unfrozen_parameters=[r"model\.layers\.1\.mlp"])
    assert len(choice.names) == 3 and choice.first_layer == 0
    with pytest.raises(ConfigError, match="freeze_trainable_layers: LlamaForCausalLM has no list of decoder layers"):
        _choose(llama, freeze_trainable_layers=1)


def test_fsdp1_without_original_parameters_is_refused_and_sharded_weights_stay_fp32(tiny_llama, tmp_path):
    """Under FSDP1 with flat parameters a layer trains whole or not at all: a freeze run says so before anything
    loads; under FSDP (or DeepSpeed) the frozen weights are not made half, and the estimate counts them as fp32."""
    import tunelab
    from tunelab.errors import ConfigError
    from tunelab.models.freeze import frozen_in_half

    settings = dict(model=str(tiny_llama), data_path=str(DATA), trainer="sft", project_name=str(tmp_path / "run"),
                    freeze_trainable_layers=1, mixed_precision="bf16")  # fmt: skip
    fsdp1 = tmp_path / "fsdp1.yaml"
    sharded = {**settings, "num_processes": 2, "accelerate_config": str(fsdp1)}
    # accelerate's spellings: the keys with or without fsdp_, its booleans as text, use_orig_params true by default
    for fsdp, refused in [
        ("fsdp_version: 1\n  fsdp_use_orig_params: 'false'", True),
        ("version: 1\n  use_orig_params: false", True),
        ("fsdp_version: 1", False),
        ("version: 2\n  use_orig_params: false", False),
    ]:
        fsdp1.write_text(f"distributed_type: FSDP\nfsdp_config:\n  {fsdp}\nnum_processes: 2\n")
        if refused:
            with pytest.raises(ConfigError, match="freeze training under FSDP1 needs fsdp_use_orig_params: true"):
                tunelab.plan(sharded)
        else:
            assert not frozen_in_half(tunelab.load_config(sharded))  # sharded: every weight fp32
    assert frozen_in_half(tunelab.load_config(settings))
    # inside a launched process accelerate's environment says it, with its own booleans (FSDP_USE_ORIG_PARAMS=1)
    from tunelab.models.freeze import check_sharding

    launched = tunelab.load_config(settings)
    for orig, refused in [("1", False), ("false", True)]:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("ACCELERATE_USE_FSDP", "true")
            env.setenv("FSDP_VERSION", "1")
            env.setenv("FSDP_USE_ORIG_PARAMS", orig)
            if refused:
                with pytest.raises(ConfigError, match="needs fsdp_use_orig_params"):
                    check_sharding(launched)
            else:
                check_sharding(launched)


def test_precomputed_reference_scores_of_a_full_run_are_not_a_freeze_run_s(tiny_llama):
    """Under bf16 a freeze run's starting model has half-type frozen weights where a full run's is fp32: the cached
    reference log-probs of one are not the other's."""
    from tunelab.methods.dpo import reference_key

    settings = dict(model=str(tiny_llama), trainer="dpo", mixed_precision="bf16", precompute_ref_log_probs=True)
    full, frozen = LLMParams(**settings), LLMParams(**settings, freeze_trainable_layers=1)
    assert reference_key(full) != reference_key(frozen)
    assert reference_key(LLMParams(**{**settings, "mixed_precision": "no"})) == reference_key(
        LLMParams(**{**settings, "mixed_precision": "no"}, freeze_trainable_layers=1)
    )  # fp32: the same starting model


def test_a_classifier_trains_its_last_layers_pooler_and_new_head(tmp_path):
    """Text classification too: a BERT's last encoder layer and its pooler (freeze_extra_modules) train with the new
    head, which always trains; the embeddings and the first layer stay as they were."""
    from transformers import BertConfig, BertModel

    import tunelab
    from tests.conftest import build_tokenizer
    from tests.test_text_classification import _sentiment_rows, _write_csv

    base = tmp_path / "tiny-bert"
    tokenizer = build_tokenizer(base, chat_template=None)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128)  # fmt: skip
    torch.manual_seed(0)
    BertModel(config).save_pretrained(base)
    _write_csv(tmp_path / "tweets" / "train.csv", _sentiment_rows("train", 64))
    folder = tunelab.train(tunelab.TextClassificationParams(
        model=str(base), data_path=str(tmp_path / "tweets"), target_column="label", project_name=str(tmp_path / "run"),
        epochs=1, batch_size=16, lr=1e-2, max_seq_length=16, freeze_trainable_layers=1, freeze_extra_modules="pooler",
    ))  # fmt: skip
    before = {f"bert.{k}": v for k, v in load_file(base / "model.safetensors").items()}
    after = load_file(folder / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if k.startswith(("bert.encoder.layer.1.", "bert.pooler."))}
    assert {k for k in after if k not in before} == {"classifier.weight", "classifier.bias"}
    # the new head trains, whatever it is called: BERT's classifier, DistilBERT's pre_classifier too, BART's
    from transformers import AutoConfig

    from tunelab.models.checks import skeleton

    sizes = dict(vocab_size=100, hidden_size=32, dim=32, hidden_dim=64, n_layers=2, n_heads=2, d_model=32,
                 encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                 encoder_ffn_dim=64, decoder_ffn_dim=64)  # fmt: skip
    for model_type, head in [("distilbert", "pre_classifier."), ("bart", "classification_head.")]:
        config = AutoConfig.for_model(model_type, **sizes)
        names = _choose(
            skeleton(config, "classifier"), unfrozen_parameters=["^nothing_matches|.*layers?\\.1\\."]
        ).names
        assert any(n.startswith(head) for n in names), (model_type, names)
