"""A CPU training run started from the CLI runs on tcmalloc (or jemalloc) when the machine has one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tunelab import allocator


def test_the_setting_picks_or_refuses_an_allocator(tmp_path, monkeypatch):
    monkeypatch.setattr(allocator, "_gpu_visible", lambda: False)
    assert allocator.chosen_library({"TUNELAB_ALLOCATOR": "system"}) is None
    library = tmp_path / "libcustom_malloc.so"
    library.write_bytes(b"")
    assert allocator.chosen_library({"TUNELAB_ALLOCATOR": str(library)}) == str(library)
    assert allocator.chosen_library({"TUNELAB_ALLOCATOR": str(tmp_path / "missing.so")}) is None
    found = allocator.find_library("tcmalloc") or allocator.find_library("jemalloc")
    assert allocator.chosen_library({}) == found  # auto: whatever is installed, tcmalloc first
    monkeypatch.setattr(allocator, "_gpu_visible", lambda: True)
    assert allocator.chosen_library({}) is None  # a GPU's activations are not malloc'd: glibc's is kept


@pytest.mark.parametrize("setting", ["auto", "system"])
def test_cli_training_restarts_itself_with_the_allocator(setting, tiny_llama, tmp_path):
    found = allocator.find_library("tcmalloc") or allocator.find_library("jemalloc")
    if setting == "auto" and (found is None or allocator.chosen_library({}) is None):
        pytest.skip("no tcmalloc or jemalloc on this machine (scripts/install.sh installs libgoogle-perftools4)")
    rows = [{"prompt": f"Spell {w}:", "completion": " " + " ".join(w)} for w in ["cat", "house", "tree"] * 4]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    command = [sys.executable, "-m", "tunelab", "llm", "--train", "--model", str(tiny_llama), "--trainer", "sft"]
    command += ["--data-path", str(data), "--max-steps", "2", "--batch-size", "2", "--block-size", "64"]
    command += ["--model-max-length", "128", "--project-name", str(tmp_path / "run"), "--log", "none"]
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.STARTED_WITH)}
    env.update(TUNELAB_ALLOCATOR=setting, HF_HUB_OFFLINE="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "model.safetensors").is_file()  # a full fine-tune (the default), saved
    if setting == "auto":  # the line is read from the process's own memory map: the library is really loaded
        assert f"memory allocator: {os.path.basename(found)}" in result.stderr
    else:
        assert "memory allocator: glibc's (TUNELAB_ALLOCATOR=system)" in result.stderr


def test_main_called_from_python_never_restarts_the_process(tiny_llama, tmp_path, monkeypatch):
    from tunelab.cli import main

    def no_exec(*args):
        raise AssertionError("main([...]) from Python replaced the process")

    monkeypatch.setattr(os, "execve", no_exec)
    monkeypatch.delenv(allocator.STARTED_WITH, raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i} of some text"}) + "\n" for i in range(8)))
    argv = ["llm", "--train", "--model", str(tiny_llama), "--data-path", str(data), "--max-steps", "1"]
    argv += ["--block-size", "32", "--model-max-length", "64", "--project-name", str(tmp_path / "run")]
    assert main(argv) == 0
    assert (tmp_path / "run" / "model.safetensors").is_file()
