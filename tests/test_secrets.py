"""The hub token never lands in the log, the error messages, or any file a run writes (finished or stopped)."""

from __future__ import annotations

import os
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


def test_a_token_on_the_command_line_moves_out_of_argv_into_hf_token(tiny_llama, tmp_path):
    """`--token` typed on the command line: the training process (and what it starts) has it as HF_TOKEN for its
    downloads and push, but not in sys.argv, which wandb records and uploads. A reward function of a GRPO run looks
    from inside the training process."""
    import json
    import os
    import subprocess
    import sys

    seen = tmp_path / "seen.json"
    rewards = tmp_path / "spy.py"
    rewards.write_text(
        "import json, os, sys\n"
        "def spy(completions, **kwargs):\n"
        f"    open({str(seen)!r}, 'w').write(json.dumps({{'argv': sys.argv, 'env': os.environ.get('HF_TOKEN')}}))\n"
        "    return [0.0] * len(completions)\n"
    )
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?"}) + "\n" for i in range(4)))
    command = [
        sys.executable, "-m", "tunelab.cli", "llm", "--train", "--trainer", "grpo", "--model", str(tiny_llama),
        "--data-path", str(data), "--project-name", str(tmp_path / "run"), "--reward-functions", f"{rewards}:spy",
        "--num-generations", "2", "--batch-size", "2", "--gradient-accumulation", "1", "--max-completion-length",
        "4", "--max-steps", "1", "--peft", "--token", "hf_SECRETonTheCommandLine",
    ]  # fmt: skip
    env = {key: value for key, value in os.environ.items() if key != "HF_TOKEN"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    inside = json.loads(seen.read_text())
    assert inside["env"] == "hf_SECRETonTheCommandLine"
    assert not any("SECRET" in arg for arg in inside["argv"]), inside["argv"]
    assert "SECRET" not in result.stdout + result.stderr
    assert not any(b"SECRET" in f.read_bytes() for f in (tmp_path / "run").rglob("*") if f.is_file())


def test_only_a_training_command_s_token_moves(monkeypatch):
    """The app's --token is its access token, not a hub token: left where it is. A training command's, in any
    spelling argparse takes, moves; a flag after --token is not taken for its value."""
    from tunelab.cli import token_to_environment

    monkeypatch.setenv("HF_TOKEN", "before")  # recorded: whatever the test sets is undone after it
    monkeypatch.delenv("HF_TOKEN")
    app = ["app", "--token", "s3cret", "--host", "0.0.0.0"]
    assert token_to_environment(list(app)) == app and "HF_TOKEN" not in os.environ
    for spelling in (["--token", "hf_a"], ["--token=hf_a"], ["--tok", "hf_a"], ["--toke=hf_a"]):
        monkeypatch.delenv("HF_TOKEN", raising=False)
        assert token_to_environment(["llm", "--train", *spelling, "--lr", "1e-4"]) == [
            "llm",
            "--train",
            "--lr",
            "1e-4",
        ]
        assert os.environ["HF_TOKEN"] == "hf_a"
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert token_to_environment(["llm", "--token", "--lr", "1"]) == ["llm", "--token", "--lr", "1"]
    assert "HF_TOKEN" not in os.environ
    assert token_to_environment(["--config", "c.yaml", "--token", "hf_b"]) == ["--config", "c.yaml"]
