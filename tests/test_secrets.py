"""The hub token never lands in the log, the error messages, or any file a run writes (finished or stopped)."""

from __future__ import annotations

from pathlib import Path

import yaml

from tunelab.cli import main

TOKEN = "hf_tunelabSecretTokenValue123"
ROOT = Path(__file__).resolve().parents[1]


def _files_with_token(*folders: Path) -> list[str]:
    found = []
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and TOKEN.encode() in path.read_bytes():
                found.append(str(path))
    return found


def _config(tmp_path: Path, model: Path, project: Path, **params) -> Path:
    config = {
        "task": "llm-sft",
        "base_model": str(model),
        "project_name": str(project),
        "data": {"path": str(ROOT / "samples" / "alpaca.jsonl"), "train_split": "train"},
        "params": {
            "block_size": 128,
            "model_max_length": 256,
            "batch_size": 2,
            "gradient_accumulation": 1,
            "max_steps": 3,
            "save_steps": 1,
            "logging_steps": 1,
            "peft": True,
            "lora_r": 4,
            "log": "tensorboard",
            **params,
        },
        "hub": {"username": "someone", "token": TOKEN, "push_to_hub": True},
    }
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_finished_run_push_failure_and_tensorboard_never_show_the_token(tiny_llama, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    project = tmp_path / "run"
    code = main(["--config", str(_config(tmp_path, tiny_llama, project))])
    out = capsys.readouterr()
    assert code == 2  # trained, then the push failed: the hub is out of reach here
    assert "cannot push to someone/run" in out.err
    assert (project / "tunelab_run.json").is_file()
    assert list(project.rglob("events.out.tfevents.*")), "tensorboard logged nothing"
    assert TOKEN not in out.out + out.err
    assert _files_with_token(project) == []
    assert "***" in (project / "training_params.json").read_text()


def test_stopped_run_and_bad_input_never_show_the_token(tiny_llama, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    project = tmp_path / "nan"
    # A NaN stop leaves the staging folder (checkpoints, run_params.json, trainer state) behind: none has the token.
    config = _config(tmp_path, tiny_llama, project, lr=1e30, warmup_ratio=0, max_grad_norm=0)
    code = main(["--config", str(config)])
    err = capsys.readouterr().err
    assert code == 2 and "at step 2" in err
    staging = tmp_path / ".nan.partial"
    assert (staging / "run_params.json").is_file() and (staging / "checkpoint-1").is_dir()
    assert TOKEN not in err
    assert _files_with_token(staging) == []

    # A parameter error and a resume refusal quote parameters: the token must not be among them.
    code = main(["llm", "--config", str(config), "--lr", "1e-3"])
    err = capsys.readouterr().err
    assert code == 2 and "other parameters" in err and TOKEN not in err
    code = main(["llm", "--config", str(config), "--batch-size", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "batch_size" in err and TOKEN not in err
