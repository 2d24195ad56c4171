"""Bad model input found before the weights load (models/checks.py, the GGUF check of models/load.py): one
`tunelab: error:` line naming the model and what to do, exit code 2, nothing written. Plus the case that used to
fail and now works: LoRA on a mixture-of-experts model with the default lora_dropout."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tests.conftest import build_tokenizer, train_losses
from tests.test_bad_input import GOOD_ROWS, assert_nothing_written, cli_args, error_line, write_jsonl
from tunelab.cli import main
from tunelab.config.llm import LLMParams
from tunelab.errors import ConfigError
from tunelab.inference.export import export_gguf
from tunelab.models import gguf_cache
from tunelab.models.checks import check_model
from tunelab.models.load import check_gguf_file, load_config, resolve_model


@pytest.fixture(autouse=True)
def own_gguf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_GGUF_CACHE", str(tmp_path / "gguf-cache"))


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", GOOD_ROWS)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama, tmp_path_factory):
    return export_gguf(tiny_llama, tmp_path_factory.mktemp("gguf") / "tiny.gguf", "f32")


def run_bad(capsys, model, data, project, *extra):
    line = error_line(capsys, main(cli_args(model, data, project, *extra)))
    assert_nothing_written(project)
    return line


def model_folder(folder, model_type, weights=True, **config):
    """A tiny random model of `model_type` with the test tokenizer; weights=False: its config.json only."""
    tokenizer = build_tokenizer(folder)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **config,
    )
    torch.manual_seed(0)
    if weights:
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    else:
        config.save_pretrained(folder)
    return folder


SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


# ------------------------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("half", "truncated or damaged GGUF file ({half:,} bytes, but its tensors end at byte {size:,})"),
        ("header", "truncated or damaged GGUF file (the header runs past the end of the file at byte 300)"),
        ("text", "not a GGUF file (it starts with b'{{\"text\":', not b'GGUF')"),
        ("empty", "the file is empty"),
    ],
    ids=["truncated", "cut-in-header", "text-file", "empty"],
)
def test_damaged_gguf_file(capsys, tmp_path, tiny_gguf, data, case, expected):
    whole = tiny_gguf.read_bytes()
    content = {"half": whole[: len(whole) // 2], "header": whole[:300], "text": data.read_bytes(), "empty": b""}[case]
    model = tmp_path / f"{case}.gguf"
    model.write_bytes(content)
    line = run_bad(capsys, model, data, tmp_path / "run")
    assert line.startswith(f"tunelab: error: model {model}: " + expected.format(half=len(whole) // 2, size=len(whole)))
    assert case == "text" or line.endswith(": download it again")


def test_folder_holding_a_truncated_gguf_file(capsys, tmp_path, tiny_gguf, data):
    """A folder with one .gguf file and no config.json is resolved to that file, and checked the same way."""
    (tmp_path / "model").mkdir()
    file = tmp_path / "model" / "tiny.gguf"
    file.write_bytes(tiny_gguf.read_bytes()[:-100])
    line = run_bad(capsys, tmp_path / "model", data, tmp_path / "run")
    assert line.startswith(f"tunelab: error: model {file}: truncated or damaged GGUF file (")


def test_whole_gguf_file_passes_and_its_config_is_cached(tiny_gguf):
    check_gguf_file(tiny_gguf)
    source = resolve_model(str(tiny_gguf))
    first = load_config(source)
    assert gguf_cache.cached(source, "config") is not None  # read from the file once, then from the cache
    again = load_config(source).to_dict()
    assert {**again, "_name_or_path": None} == {**first.to_dict(), "_name_or_path": None}  # it names the cache


def test_config_json_that_is_not_json(capsys, tmp_path, tiny_llama, data):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    (model / "config.json").write_text('{"model_type": "llama", ', encoding="utf-8")
    line = run_bad(capsys, model, data, tmp_path / "run")
    assert line.startswith(f"tunelab: error: model {model}: config.json is not valid JSON (")
    assert line.endswith("): fix or download it")


@pytest.mark.parametrize("damage", ["truncated", "missing shard", "no weights"])
def test_model_folder_with_damaged_weights(capsys, tmp_path, tiny_llama, data, damage):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    weights = model / "model.safetensors"
    size = weights.stat().st_size
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: size // 2])
    elif damage == "missing shard":
        weights.rename(model / "model-00001-of-00002.safetensors")
        shards = {"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"}
        (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}), encoding="utf-8")
    else:
        weights.unlink()
    line = run_bad(capsys, model, data, tmp_path / "run")
    expected = {
        "truncated": f"model folder {model}: model.safetensors is truncated ({size // 2:,} bytes; its header "
        f"describes {size:,}): download it again",
        "missing shard": f"model folder {model}: model-00002-of-00002.safetensors is missing: download it again",
        "no weights": f"model folder {model} has no weights (no model.safetensors): download it again",
    }[damage]
    assert line == f"tunelab: error: {expected}"


# ------------------------------------------------------------------------- configs transformers cannot use


def test_model_type_transformers_does_not_know(capsys, tmp_path, data):
    model = model_folder(tmp_path / "model", "llama", weights=False, **SMALL)
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    (model / "config.json").write_text(json.dumps({**config, "model_type": "foo"}), encoding="utf-8")
    line = run_bad(capsys, model, data, tmp_path / "run")
    assert f"model {model}: config.json has model_type 'foo', which transformers" in line
    assert "does not know" in line


@pytest.mark.parametrize(
    ("model_type", "command", "auto_class"),
    [
        ("t5", "llm", "AutoModelForCausalLM"),
        ("granite", "reward", "AutoModelForSequenceClassification"),
        ("granite", "text-classification", "AutoModelForSequenceClassification"),
    ],
)
def test_model_type_without_a_class_for_the_task(capsys, tmp_path, data, model_type, command, auto_class):
    config = dict(d_model=64, d_ff=128, num_layers=2, num_heads=4) if model_type == "t5" else SMALL
    model = model_folder(tmp_path / "model", model_type, weights=False, **config)
    project = tmp_path / "run"
    if command == "text-classification":
        table = tmp_path / "train.csv"
        table.write_text("text,label\n" + "".join(f"text {i},{i % 2}\n" for i in range(8)), encoding="utf-8")
        args = ["text-classification", "--train", "--model", str(model), "--data-path", str(table)]
        args += ["--text-column", "text", "--target-column", "label", "--project-name", str(project)]
    else:
        trainer = "sft" if command == "llm" else command
        args = cli_args(model, data, project, "--block-size", "128", "--trainer", trainer)
    line = error_line(capsys, main(args))
    assert_nothing_written(project)
    assert line.startswith(
        f"tunelab: error: model {model}: transformers has no {auto_class} class for model type {model_type!r} ("
    )


def test_quantization_of_a_gguf_model_is_refused_before_loading(tiny_gguf):
    """On a CUDA machine this is the line the CLI shows (on CPU the missing GPU is named first)."""
    params = LLMParams(model=str(tiny_gguf), data_path="unused", peft=True, quantization="int4")
    with pytest.raises(ConfigError, match=r"quantization=int4: model .*tiny\.gguf is a GGUF file"):
        check_model(resolve_model(str(tiny_gguf)), params)


# ------------------------------------------------------------------------------------------------- lengths


def test_block_size_past_learned_positions(capsys, tmp_path, data):
    """GPT-2 learned one embedding per position: a longer row would fail at the first step (an IndexError)."""
    model = model_folder(tmp_path / "model", "gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=64)
    line = run_bad(capsys, model, data, tmp_path / "run", "--block-size", "128")
    assert line == (
        f"tunelab: error: block_size (128) is longer than the 64 positions of model {model} "
        "(max_position_embeddings, one learned embedding each): lower block_size to 64 or less"
    )


def test_block_size_past_rope_positions_warns(capsys, tmp_path, tiny_llama, data):
    """A RoPE model runs on longer rows (it computes its positions): a warning, the run goes on."""
    longer = ["--block-size", "1024", "--model-max-length", "2048"]
    args = cli_args(tiny_llama, data, tmp_path / "run", "--dry-run", *longer)
    assert main(args) == 0
    err = capsys.readouterr().err
    warning = f"tunelab: block_size (1024) is longer than the 512 positions of {tiny_llama} (max_position_embeddings)"
    assert err.count(warning) == 1, err


# ------------------------------------------------------------------------------------------- LoRA targets


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        ("qproj,v_proj", "target_modules: model {model} (llama) has no module named qproj; its linear layers are "
         "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj (or use all-linear)"),
        ("wq,wk", "target_modules: model {model} (llama) has no module named wq or wk; its linear layers are"),
        (r".*\.q_proj", "has no module named .*\\.q_proj (they are names, not patterns)"),
        ("mlp", "target_modules: model.layers.0.mlp (LlamaMLP) is not a layer LoRA can adapt; name linear layers"),
        (" , ", "target_modules ' , ' names no module"),
    ],
    ids=["typo", "two-missing", "pattern", "not-a-layer", "no-names"],
)  # fmt: skip
def test_target_modules_the_model_does_not_have(capsys, tmp_path, tiny_llama, data, targets, expected):
    line = run_bad(capsys, tiny_llama, data, tmp_path / "run", "--peft", "--target-modules", targets)
    assert expected.format(model=tiny_llama) in line


def test_target_modules_the_model_has_pass(capsys, tmp_path, tiny_llama, data):
    args = cli_args(tiny_llama, data, tmp_path / "run", "--dry-run", "--peft", "--target-modules", "q_proj,down_proj")
    assert main(args) == 0, capsys.readouterr().err


# ------------------------------------------------------------------------------------- mixture of experts


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    """A 2-layer Qwen3-MoE (4 experts, 2 per token): transformers fuses each layer's experts into parameters."""
    moe = dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, head_dim=16)
    return model_folder(tmp_path_factory.mktemp("tiny-moe"), "qwen3_moe", **SMALL, **moe, max_position_embeddings=512)


def test_lora_with_dropout_on_a_mixture_of_experts_model(capsys, tmp_path, tiny_moe, data):
    """PEFT adapts the fused experts as parameters, where it has no dropout and refuses lora_dropout > 0: the
    default 0.05 stays on the attention layers and is off for the experts, said once in the log."""
    run = tmp_path / "run"
    assert main(cli_args(tiny_moe, data, run, "--peft")) == 0
    err = capsys.readouterr().err
    note = "tunelab: lora_dropout: off for the mixture-of-experts parameters (PEFT cannot drop out there), 0.05"
    assert err.count(note) == 1, err
    assert "Warning" not in err, err
    assert all(math.isfinite(loss) for loss in train_losses(run))
    adapter = json.loads((run / "adapter_config.json").read_text(encoding="utf-8"))
    assert adapter["lora_dropout"] == 0 and "gate_up_proj" in adapter["target_parameters"]

    torch.manual_seed(0)
    assert main(["generate", "--model", str(run), "--max-new-tokens", "8", "--do-sample", "Example number"]) == 0
    assert capsys.readouterr().out.strip()


def test_target_modules_on_fused_experts(capsys, tmp_path, tiny_moe, data):
    """The experts' gate_proj and up_proj are one fused parameter: both or neither (PEFT's rule, said up front)."""
    line = run_bad(capsys, tiny_moe, data, tmp_path / "run", "--peft", "--target-modules", "gate_proj,q_proj")
    assert "target_modules: Cannot convert PEFT target(s) gate_proj without also targeting up_proj" in line
    args = cli_args(tiny_moe, data, tmp_path / "run", "--dry-run", "--peft", "--target-modules", "gate_proj,up_proj")
    assert main(args) == 0, capsys.readouterr().err


@pytest.mark.parametrize("variant", [["--use-dora"], ["--init-lora-weights", "pissa"]], ids=["dora", "pissa"])
def test_lora_variants_on_fused_experts_are_refused_before_loading(capsys, tmp_path, tiny_moe, data, variant):
    """PEFT adapts the fused experts as parameters, where it has neither DoRA nor PiSSA/OLoRA (each failed once the
    weights were loaded, in a traceback); on the attention layers alone they train."""
    line = run_bad(capsys, tiny_moe, data, tmp_path / "run", "--peft", *variant)
    setting = "use_dora" if variant == ["--use-dora"] else "init_lora_weights=pissa"
    assert f"{setting}: model" in line and "(qwen3_moe) keeps its experts' weights fused in parameters" in line
    assert "gate_up_proj" in line and "target_modules to the attention layers" in line
    args = cli_args(tiny_moe, data, tmp_path / "run", "--peft", *variant, "--target-modules", "q_proj,v_proj")
    assert main(args) == 0, capsys.readouterr().err


# ------------------------------------------------------------------------------------------- LoRA variants


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--use-dora"], "use_dora is a LoRA setting: add --peft (or drop it)"),
        (["--peft", "--loraplus-lr-ratio", "0.5"], "loraplus_lr_ratio must be 1 or more"),
        (["--peft", "--lora-rank-pattern", "q_proj=big"], "lora_rank_pattern: q_proj='big' is not a module=number"),
        (
            ["--peft", "--init-lora-weights", "loftq"],
            "init_lora_weights=loftq is not offered: PEFT's LoftQ quantizes every weight with bitsandbytes",
        ),
        (["--peft", "--use-dora", "--init-lora-weights", "pissa"], "use_dora with init_lora_weights=pissa"),
        (["--peft", "--modules-to-save", "lm_head,embed"], "modules_to_save: model {model} has no module named embed"),
    ],
    ids=["no-peft", "loraplus-below-1", "bad-pattern", "loftq", "dora-with-pissa", "missing-module"],
)
def test_lora_variants_that_cannot_work(capsys, tmp_path, tiny_llama, data, extra, expected):
    line = run_bad(capsys, tiny_llama, data, tmp_path / "run", *extra)
    assert expected.format(model=tiny_llama) in line


def test_dora_on_a_gptq_model_is_refused_before_loading(capsys, tmp_path, data):
    """PEFT has no DoRA for GPTQ (AWQ, AQLM, EETQ) layers: found from config.json, before anything loads."""
    folder = model_folder(tmp_path / "gptq", "llama", **SMALL)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (folder / "config.json").write_text(json.dumps(config))
    line = run_bad(capsys, folder, data, tmp_path / "run", "--peft", "--use-dora")
    assert "use_dora: model" in line and "is gptq-quantized, and PEFT has no DoRA for gptq layers" in line
