"""rope_scaling: a model trained on rows longer than its positions, its rotary positions stretched (linear, yarn).
The stretch is in the trained model wherever it goes next: a full model's config.json, an adapter's run record
(the base stretched again when loaded), the merged model, a DPO reference; and what cannot be stretched is said in
one line before anything loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import build_tiny_llama, train_losses
from tests.test_bad_input import assert_nothing_written, cli_args, error_line
from tunelab.cli import main
from tunelab.config.llm import LLMParams
from tunelab.errors import ConfigError
from tunelab.inference.generate import GenerationParams, generate, load_run

POSITIONS = 32  # the tiny model's own; the answer below is longer
ANSWER = (  # about 93 tokens of the test tokenizer: with the prompt, within block_size 128
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa quebec "
    "romeo sierra tango uniform victor whiskey xray"
)


@pytest.fixture(scope="module")
def short_llama(tmp_path_factory) -> Path:
    """The tiny Llama with 32 positions only."""
    folder = build_tiny_llama(tmp_path_factory.mktemp("short-llama"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": POSITIONS}))
    return folder


@pytest.fixture(scope="module")
def recital(tmp_path_factory) -> Path:
    rows = [{"messages": [{"role": "user", "content": "Recite."}, {"role": "assistant", "content": ANSWER}]}] * 16
    data = tmp_path_factory.mktemp("recital") / "recital.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return data


def _train(model: Path, data: Path, run: Path, *flags: str) -> int:
    return main(
        [
            "llm", "--train", "--model", str(model), "--data-path", str(data), "--trainer", "sft",
            "--chat-template", "chatml", "--lr", "3e-3", "--epochs", "60", "--batch-size", "8",
            "--gradient-accumulation", "1", "--block-size", "128", "--project-name", str(run),
            "--disable-gradient-checkpointing", "--logging-steps", "10", *flags,
        ]
    )  # fmt: skip


def _frequencies(model) -> torch.Tensor:
    return next(m.inv_freq for m in model.modules() if hasattr(m, "rope_type"))


def test_rope_scaling_reads_llama_factorys_and_axolotls_forms():
    assert (LLMParams(rope_scaling="YaRN").rope_scaling, LLMParams(rope_scaling="linear").rope_scaling_factor) == (
        "yarn",
        None,
    )
    axolotl = LLMParams(rope_scaling={"type": "linear", "factor": 4})
    assert (axolotl.rope_scaling, axolotl.rope_scaling_factor) == ("linear", 4.0)
    assert LLMParams(rope_scaling={"rope_type": "yarn"}, rope_scaling_factor=2).rope_scaling_factor == 2.0
    for bad, said in [
        (dict(rope_scaling="dynamic"), "rope_scaling: 'dynamic' is not one of none, linear, yarn"),
        (dict(rope_scaling_factor=2.0), "rope_scaling_factor needs rope_scaling"),
        (dict(rope_scaling="linear", rope_scaling_factor=1.0), "rope_scaling_factor must be above 1"),
        (dict(rope_scaling={"type": "linear", "factor": 2}, rope_scaling_factor=3), "differ"),
        (dict(rope_scaling={"kind": "linear"}), "got kind"),
        (dict(rope_scaling={"type": "linear", "rope_type": "yarn"}), "got types"),
        (dict(rope_scaling={"type": "yarn", "original_max_position_embeddings": 4096}), "read from its config"),
        (dict(rope_scaling="linear", rope_scaling_factor=float("inf")), "must be above 1"),
    ]:
        with pytest.raises(ConfigError, match=said):
            LLMParams(**bad)


def test_a_full_fine_tune_past_the_models_positions_keeps_the_stretch(short_llama, recital, tmp_path):
    """yarn, the factor from block_size: the saved config.json stretches the positions (so every later load does),
    and the reloaded model recites the whole answer, past its original 32 positions, as it learned it."""
    run = tmp_path / "run"
    assert _train(short_llama, recital, run, "--rope-scaling", "yarn") == 0
    config = json.loads((run / "config.json").read_text())
    rope = config["rope_parameters"]
    assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"]) == ("yarn", 4.0, POSITIONS)
    assert config["max_position_embeddings"] == 4 * POSITIONS
    losses = train_losses(run)
    assert losses[-1] < 0.2 * losses[0]
    model, tokenizer = load_run(run)
    assert len(tokenizer(ANSWER)["input_ids"]) > 2 * POSITIONS  # the recital reaches well past the old positions
    params = GenerationParams(max_new_tokens=4 * POSITIONS)
    assert generate(model, tokenizer, "Recite.", params) == [ANSWER]


def test_an_adapter_run_stretches_its_base_again_wherever_it_loads(short_llama, recital, tmp_path):
    """linear, LoRA: the base's own config is unchanged, so the run record says how it was stretched; load_run and
    merge stretch the base again. The adapter on the base as it was would compute other logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunelab.inference.merge import merge_run

    run = tmp_path / "run"
    assert _train(short_llama, recital, run, "--peft", "--rope-scaling", "linear", "--lora-r", "8") == 0
    assert json.loads((run / "tunelab_run.json").read_text())["rope_scaling"] == {
        "rope_type": "linear",
        "factor": 4.0,
        "original_max_position_embeddings": POSITIONS,
    }
    losses = train_losses(run)
    assert losses[-1] < 0.9 * losses[0]

    model, tokenizer = load_run(run)
    base = AutoModelForCausalLM.from_pretrained(short_llama)
    assert torch.allclose(_frequencies(model), _frequencies(base) / 4)  # linear: every frequency divided
    ids = torch.tensor([tokenizer(f"{ANSWER} {ANSWER}")["input_ids"][: 4 * POSITIONS]])
    with torch.no_grad():
        stretched = model(ids).logits
        unstretched = PeftModel.from_pretrained(base, run).eval()(ids).logits
    assert (stretched - unstretched).abs().max() > 1e-2  # the stretch matters to what the adapter computes

    # A checkpoint folder has no record of its own: the finished run's beside it says, or the unfinished run's
    # parameters do.
    from tunelab.outputs import rope_scaling_of_run

    record = json.loads((run / "tunelab_run.json").read_text())["rope_scaling"]
    unfinished = tmp_path / ".again.partial"
    for checkpoint in (run / "checkpoint-9", unfinished / "checkpoint-9"):
        checkpoint.mkdir(parents=True)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            (checkpoint / name).write_bytes((run / name).read_bytes())
    (unfinished / "run_params.json").write_text((run / "training_params.json").read_text())
    assert rope_scaling_of_run(run / "checkpoint-9") == rope_scaling_of_run(unfinished / "checkpoint-9") == record

    merged = merge_run(run, tmp_path / "merged")
    config = json.loads((merged / "config.json").read_text())
    assert (config["rope_parameters"]["rope_type"], config["max_position_embeddings"]) == ("linear", 4 * POSITIONS)
    with torch.no_grad():
        again = AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits
    assert torch.allclose(again, stretched, atol=1e-4)


def test_a_reference_model_is_stretched_as_the_trained_model_is(short_llama, tmp_path):
    from tunelab.models import load_reference

    params = LLMParams(trainer="dpo", model=str(short_llama), model_ref=str(short_llama), block_size=128)
    params.rope_scaling = "linear"
    assert load_reference(params).config.max_position_embeddings == 4 * POSITIONS
    params.rope_scaling_factor = 8.0  # the same factor as the model trained, given or worked out
    assert load_reference(params).config.max_position_embeddings == 8 * POSITIONS
    params.block_size, params.rope_scaling_factor = POSITIONS, None  # reaching already: left as it is
    assert load_reference(params).config.max_position_embeddings == POSITIONS
    params.block_size, params.model_ref = 128, str(_scaled_copy(short_llama, tmp_path / "scaled"))
    rope = load_reference(params).config.rope_parameters  # scaled already: as it is
    assert (rope["rope_type"], rope["factor"]) == ("linear", 2.0)


def test_yarn_on_a_model_without_head_dim_in_its_config():
    """Mixtral's config leaves head_dim None and transformers' YaRN reads it without a fallback."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from tunelab.models.positions import stretch_model

    config = MixtralConfig(
        vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=2, max_position_embeddings=POSITIONS,
    )  # fmt: skip
    model = MixtralForCausalLM(config)
    before = _frequencies(model).clone()
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": POSITIONS}
    stretch_model(model, scaling)
    assert model.config.max_position_embeddings == 4 * POSITIONS
    assert not torch.equal(_frequencies(model), before)
    model(torch.tensor([[i % 64 for i in range(100)]]))  # runs past the old positions


def _scaled_copy(model: Path, folder: Path) -> Path:
    """`model` with a linear x2 scaling of its own in its config (its files linked)."""
    folder.mkdir()
    config = json.loads((model / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(config))
    for file in model.iterdir():
        if file.name != "config.json":
            (folder / file.name).symlink_to(file)
    return folder


def test_the_dry_run_says_how_far_the_positions_reach(capsys, short_llama, recital, tmp_path):
    args = cli_args(
        short_llama, recital, tmp_path / "run", "--dry-run", "--block-size", "100", "--rope-scaling", "yarn"
    )
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "positions: rotary yarn scaling x4, 32 -> 128 positions (rope_scaling)" in out
    assert "longer than the 32 positions" not in err  # stretched, the rows fit: no warning


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (
            ["--block-size", "32", "--rope-scaling", "linear"],
            "rope_scaling: block_size 32 fits within the 32 positions of model {model}: nothing to stretch. Raise "
            "block_size past it, or give rope_scaling_factor to stretch anyway",
        ),
        (["--block-size", "64", "--rope-scaling", "yarn", "--model", "gpt2"], "has no rotary positions to stretch"),
        (
            ["--block-size", "64", "--rope-scaling", "yarn", "--model", "scaled"],
            "already scales its positions (linear",
        ),
        (
            ["--block-size", "128", "--rope-scaling", "linear", "--rope-scaling-factor", "2"],
            "rope_scaling_factor 2 stretches the 32 positions of model {model} to 64, short of block_size 128: give "
            "at least 4",
        ),
        (
            ["--block-size", "64", "--rope-scaling", "linear", "--model", "phi3"],
            "(phi3) does not take linear scaling: transformers refuses its config",
        ),
    ],
)
def test_what_cannot_be_stretched_is_said_before_loading(capsys, short_llama, recital, tmp_path, flags, said):
    from tests.test_bad_model_input import model_folder

    model = short_llama
    if "--model" in flags:
        kind = flags.pop(flags.index("--model") + 1)
        flags.remove("--model")
        if kind == "phi3":
            model = model_folder(
                tmp_path / "phi3", "phi3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=32, original_max_position_embeddings=32, pad_token_id=0,
            )  # fmt: skip
        elif kind == "gpt2":
            model = model_folder(tmp_path / "gpt2", "gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=32)
        else:
            model = _scaled_copy(short_llama, tmp_path / "scaled")
    project = tmp_path / "run"
    line = error_line(capsys, main(cli_args(model, recital, project, *flags)))
    assert said.format(model=model) in line
    assert_nothing_written(project)
