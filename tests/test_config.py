"""Parameters: one object, three front doors (CLI flags, config YAML, Python), AutoTrain's dialect mapped."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import yaml

from tests.conftest import SHARED
from tests.test_bad_input import check_error
from tunelab import LLMParams, load_config
from tunelab.cli import build_parser, main, param_flags
from tunelab.config import read_config_file
from tunelab.config.overrides import build_params
from tunelab.errors import ConfigError

AUTOTRAIN_LLM_CONFIGS = sorted((SHARED / "autotrain-configs").glob("llm_finetuning__*.yml"))


def cli_params(argv: list[str]) -> LLMParams:
    args = build_parser().parse_args(["llm", "--train", *argv])
    return load_config(param_flags(args))


def test_defaults_are_sensible():
    params = LLMParams()
    assert params.model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert params.trainer == "default" and params.block_size == 1024 and params.model_max_length == 2048
    assert params.lr == 3e-5 and params.batch_size == 2 and params.peft is False and params.quantization is None


@pytest.mark.skipif(not AUTOTRAIN_LLM_CONFIGS, reason="../shared/autotrain-configs not present")
@pytest.mark.parametrize("path", AUTOTRAIN_LLM_CONFIGS, ids=lambda p: p.stem)
def test_autotrain_configs_map_every_key(path, monkeypatch):
    monkeypatch.setenv("HF_USERNAME", "someone")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    raw = yaml.safe_load(path.read_text())
    values = read_config_file(path)
    expected_trainer = {"llm-sft": "sft", "llm-orpo": "orpo", "llm-dpo": "dpo", "llm-reward": "reward"}[raw["task"]]
    assert values["trainer"] == expected_trainer
    assert values["model"] == raw["base_model"]
    assert values["data_path"] == raw["data"]["path"]
    assert values["token"] == "hf_secret_value" and values["username"] == "someone"
    for key, value in raw["data"]["column_mapping"].items():
        assert values[key] == value
    for key, value in raw["params"].items():
        assert values[key] == value, key
    if expected_trainer == "sft":  # the trainers of later issues map too, but cannot be built yet
        params = build_params(values)
        assert params.block_size == raw["params"]["block_size"]
        assert "hf_secret_value" not in repr(params) and "hf_secret_value" not in params.to_json()


def test_unset_env_var_becomes_none(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    params = load_config({"task": "llm-sft", "base_model": "m", "hub": {"token": "${HF_TOKEN}", "push_to_hub": False}})
    assert params.token is None


def test_unset_env_var_is_named_where_its_value_is_needed(monkeypatch, tmp_path, capsys):
    """AutoTrain's configs say `username: ${HF_USERNAME}` with push_to_hub: true; with HF_USERNAME unset the error
    names the variable, not only the empty parameter it left."""
    monkeypatch.delenv("HF_USERNAME", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    config = tmp_path / "config.yml"
    config.write_text(
        "task: llm-sft\nbase_model: m\nproject_name: p\ndata: {path: d}\n"
        "hub:\n  username: ${HF_USERNAME}\n  token: ${HF_TOKEN}\n  push_to_hub: true\n",
        encoding="utf-8",
    )
    line = check_error(main(["--config", str(config)]), *capsys.readouterr())
    assert "push_to_hub needs username" in line and "username is ${HF_USERNAME}" in line, line
    assert "not set in the environment" in line, line
    assert not (tmp_path / "p").exists()


def test_unset_env_var_for_a_required_parameter_names_the_variable(monkeypatch):
    monkeypatch.delenv("TUNELAB_TEST_MODEL", raising=False)
    with pytest.raises(ConfigError, match=r"model: \$\{TUNELAB_TEST_MODEL\} is not set in the environment"):
        load_config({"task": "llm-sft", "base_model": "${TUNELAB_TEST_MODEL}"})
    monkeypatch.setenv("TUNELAB_TEST_MODEL", "some/model")
    assert load_config({"task": "llm-sft", "base_model": "${TUNELAB_TEST_MODEL}"}).model == "some/model"


def test_push_to_hub_without_any_token_is_refused_before_training(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="push_to_hub needs a token"):
        load_config({"model": "m", "push_to_hub": True, "username": "someone"})
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    assert load_config({"model": "m", "push_to_hub": True, "username": "someone"}).push_to_hub


def test_same_run_from_cli_config_and_python(tmp_path):
    config = {
        "task": "llm-sft",
        "base_model": "some/model",
        "project_name": "my-run",
        "log": "tensorboard",
        "backend": "local",
        "data": {
            "path": "data/",
            "train_split": "train",
            "valid_split": None,
            "chat_template": "chatml",
            "column_mapping": {"text_column": "messages"},
        },
        "params": {
            "block_size": 512,
            "model_max_length": 1024,
            "epochs": 2,
            "batch_size": 4,
            "lr": 2e-4,
            "peft": True,
            "lora_r": 8,
            "gradient_accumulation": 2,
            "max_steps": 30,
        },
        "hub": {"username": None, "token": None, "push_to_hub": False},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    from_yaml = load_config(path)
    from_cli = cli_params(
        [
            "--model",
            "some/model",
            "--project-name",
            "my-run",
            "--log",
            "tensorboard",
            "--data-path",
            "data/",
            "--chat_template",
            "chatml",
            "--text-column",
            "messages",
            "--trainer",
            "sft",
            "--block_size",
            "512",
            "--model-max-length",
            "1024",
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--lr",
            "2e-4",
            "--use-peft",
            "--lora-r",
            "8",
            "--gradient-accumulation",
            "2",
            "--max-steps",
            "30",
        ]
    )
    from_python = LLMParams(
        model="some/model",
        project_name="my-run",
        log="tensorboard",
        data_path="data/",
        chat_template="chatml",
        text_column="messages",
        trainer="sft",
        block_size=512,
        model_max_length=1024,
        epochs=2,
        batch_size=4,
        lr=2e-4,
        peft=True,
        lora_r=8,
        gradient_accumulation=2,
        max_steps=30,
    )
    assert from_yaml == from_cli == from_python


def test_old_autotrain_flag_spellings():
    params = cli_params(
        [
            "--model",
            "m",
            "--data-path",
            "d",
            "--trainer",
            "sft",
            "--use-peft",
            "--use-int4",
            "--fp16",
            "--learning-rate",
            "1e-4",
            "--train-batch-size",
            "3",
            "--num-train-epochs",
            "2",
            "--push-to-hub",
            "--token",
            "hf_x",
            "--repo-id",
            "me/run",
            "--merge_adapter",
        ]
    )
    assert params.peft and params.quantization == "int4" and params.mixed_precision == "fp16"
    assert (params.lr, params.batch_size, params.epochs) == (1e-4, 3, 2)
    assert params.push_to_hub and params.repo_id == "me/run" and params.token == "hf_x" and params.merge_adapter


def test_every_field_has_a_flag_and_help():
    parser = build_parser()
    llm = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("llm"))
    dests = {a.dest for a in llm._actions if a.help != argparse.SUPPRESS}
    for f in dataclasses.fields(LLMParams):
        assert f.name in dests, f.name
        assert f.metadata["help"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"block_size": 4096, "model_max_length": 2048}, "block_size \\(4096\\) is larger than model_max_length"),
        ({"chat_template": "llama9"}, "chat_template: 'llama9' is not one of"),
        ({"trainer": "sfft"}, "trainer: 'sfft' is not one of default, sft"),
        ({"lr": -1}, "lr must be positive"),
        ({"learnin_rate": 1e-4}, "unknown parameter 'learnin_rate'; did you mean 'learning_rate'"),
        ({"lora_r": "abc"}, "lora_r: expected a number"),
        ({"quantization": "int4"}, "add --peft"),
        ({"mixed_precision": "fp8"}, "mixed_precision: 'fp8' is not one of"),
    ],
)
def test_bad_parameters_name_the_problem(values, message):
    with pytest.raises(ConfigError, match=message):
        load_config(values)


def test_unknown_top_level_key_in_autotrain_config():
    with pytest.raises(ConfigError, match="unknown parameter 'paramz'"):
        load_config({"task": "llm-sft", "base_model": "m", "paramz": {}})
    with pytest.raises(ConfigError, match="unknown key data.pth"):
        load_config({"task": "llm-sft", "base_model": "m", "data": {"pth": "x"}})


def test_token_is_redacted_everywhere_it_is_shown():
    params = LLMParams(token="hf_verysecret", push_to_hub=True, username="me")
    assert "hf_verysecret" not in repr(params)
    assert "hf_verysecret" not in params.to_json()
    assert params.to_dict(redact=False)["token"] == "hf_verysecret"


BAD_CONFIGS = {
    "tab indentation": ("task: llm-sft\nparams:\n\tlr: 1e-4\n", "line 3, column 1: not valid YAML", "not tabs"),
    "unclosed list": ("task: llm-sft\nparams: [1, 2\n", "not valid YAML (expected ',' or ']'", ""),
    "params not a mapping": ("task: llm-sft\nparams: 5\n", "params must be a mapping", "got int 5"),
    "hub not a mapping": ("task: llm-sft\nhub: [a]\n", "hub must be a mapping", "got list"),
    "column_mapping not a mapping": ("task: llm-sft\ndata: {path: d, column_mapping: text}\n", "column_mapping", ""),
    "task not a name": ("task: [llm-sft]\n", "task must be a task name", ""),
    "a list for a number": ("task: llm-sft\nparams: {lr: [1, 2]}\n", "lr: expected one value, got list", ""),
    "yes/no for a text": ("task: llm-sft\nparams: {padding: no}\n", "padding: expected text, got False", "quote it"),
    "a fraction of epochs": ("task: llm-sft\nparams: {epochs: 1.5}\n", "epochs: expected a whole number", ""),
    "not UTF-8": ("task: llm-sft\nbase_model: caf\xe9\n", "not a UTF-8 text file", ""),
}


@pytest.mark.parametrize("name", BAD_CONFIGS)
def test_a_malformed_config_file_is_one_line_naming_what_to_fix(name, tmp_path, capsys):
    text, expected, hint = BAD_CONFIGS[name]
    config = tmp_path / "config.yml"
    config.write_bytes(text.encode("latin-1"))
    line = check_error(main(["--config", str(config)]), *capsys.readouterr())
    assert expected in line and hint in line, line
    assert str(config) in line or expected.split(":")[0] in line


def test_numbers_where_text_is_expected_are_read_as_text():
    params = load_config({"task": "llm-sft", "base_model": "m", "project_name": 2024, "hub": {"username": 42}})
    assert params.project_name == "2024" and params.username == "42"


def test_version_is_printed(capsys):
    import tunelab
    from tunelab.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"tunelab {tunelab.__version__}"


def test_an_infinite_valid_size_is_refused_in_one_line(capsys):
    from tunelab.cli import main

    assert main(["llm", "--dry-run", "--data-path", "unused.jsonl", "--valid-size", "inf"]) == 2
    err = capsys.readouterr().err
    assert "valid_size must be a share of the train split" in err and "Traceback" not in err
