"""Scaling out through accelerate: 2 CPU processes (gloo) with per-device batch b train exactly like 1 process with
batch 2b, and write one run folder; the shipped FSDP and DeepSpeed configs are accepted by accelerate's parser."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import SHARED_DATA, train_losses
from tunelab.launch import CONFIGS, launch_command

ROOT = Path(__file__).resolve().parents[1]


def _tunelab(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("WORLD_SIZE", None)
    return subprocess.run(
        [sys.executable, "-m", "tunelab.cli", *args], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT
    )


def _run(
    model: Path, project: Path, batch: int, *extra: str, peft: tuple = ("--peft",)
) -> subprocess.CompletedProcess:
    # 1,500 rows when ../shared is there: more than one length-grouped "megabatch", so the batch order itself is
    # put to the test (it must not depend on the number of processes).
    data = SHARED_DATA / "alpaca" / "train.jsonl"
    data = data if data.is_file() else ROOT / "samples" / "alpaca.jsonl"
    return _tunelab(
        "llm", "--train", "--model", str(model), "--data-path", str(data),
        "--project-name", str(project), "--trainer", "sft", *peft, "--lora-r", "8", "--lora-dropout", "0",
        "--lr", "2e-3", "--batch-size", str(batch), "--gradient-accumulation", "2", "--max-steps", "6",
        "--logging-steps", "1", "--block-size", "128", "--model-max-length", "256", "--save-steps", "3",
        *extra,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    ("peft", "extra"),
    [(("--peft",), ()), ((), ("--disable-gradient-checkpointing",))],
    ids=["lora", "full-no-checkpointing"],
)
def test_two_processes_with_batch_b_equal_one_process_with_batch_2b(tiny_llama, tmp_path, peft, extra):
    one = tmp_path / "one"
    single = _run(tiny_llama, one, 4, *extra, peft=peft)
    assert single.returncode == 0, single.stderr[-3000:]

    two = tmp_path / "two"
    cache = tmp_path.parent / f"{tmp_path.name}-cache"  # beside tmp_path: its listing is checked below
    double = _run(tiny_llama, two, 2, "--num-processes", "2", "--cache-dir", str(cache), *extra, peft=peft)
    assert double.returncode == 0, double.stderr[-3000:]
    assert "launching 2 processes" in double.stderr
    # Prepared once (by the checks before the launch), reused by the launched processes.
    assert double.stderr.count("prepared data: prepared in") == 1, double.stderr[-3000:]
    assert "prepared data: reused" in double.stderr
    assert "effective batch 8 rows" in double.stderr  # 2 per device x 2 accumulated x 2 processes

    expected, got = train_losses(one), train_losses(two)
    assert len(got) == len(expected) == 6
    assert got == pytest.approx(expected, rel=2e-4), (got, expected)
    weights = "adapter_model.safetensors" if peft else "model.safetensors"
    a, b = load_file(one / weights), load_file(two / weights)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-5)
    # One run folder, written once: no leftovers from the second process.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]
    assert (two / "tunelab_run.json").is_file() and not (two / "training_args.bin").exists()


def test_a_bad_row_is_reported_once_before_any_process_starts(tiny_llama, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"text": ""}\n', encoding="utf-8")
    result = _tunelab(
        "llm", "--train", "--model", str(tiny_llama), "--data-path", str(data), "--project-name",
        str(tmp_path / "p"), "--num-processes", "2",
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("tunelab: error:") == 1 and "line 2" in result.stderr
    assert "launching" not in result.stderr


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_are_accepted_by_accelerate(name, monkeypatch):
    """accelerate's own launcher parses each config, merges it with tunelab's command line and builds the
    environment its processes would get (DeepSpeed's is checked as accelerate passes it on; deepspeed itself
    is not needed)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import prepare_multi_gpu_env

    import tunelab

    config = load_config_from_file(str(CONFIGS / name))
    backend = {"ddp.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP"}.get(name, "DEEPSPEED")
    assert config.distributed_type.value == backend

    params = tunelab.LLMParams(num_processes=8, num_machines=2, machine_rank=1, main_process_ip="10.0.0.1")
    params.accelerate_config = str(CONFIGS / name)
    command = launch_command(params, ["llm", "--train"])
    launch_args = command[command.index("accelerate.commands.launch") + 1 :]
    args = launch_command_parser().parse_args(launch_args)
    args, _, _ = _validate_launch_command(args)
    assert (args.num_processes, args.num_machines, args.machine_rank) == (16, 2, 1)
    assert args.main_process_ip == "10.0.0.1" and args.module and args.training_script == "tunelab.cli"
    if backend == "FSDP":
        env = prepare_multi_gpu_env(args)
        assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
        assert env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT" and env["FSDP_ACTIVATION_CHECKPOINTING"] == "true"
    if backend == "DEEPSPEED":
        assert args.use_deepspeed and args.zero_stage in (2, 3)
        if args.zero_stage == 3:
            assert args.offload_param_device == "cpu" and args.offload_optimizer_device == "cpu"
            assert args.zero3_save_16bit_model in (True, "true")


@pytest.mark.slow
def test_python_api_launches_too(tiny_llama, tmp_path):
    import tunelab

    folder = tunelab.train(
        model=str(tiny_llama), data_path=str(ROOT / "samples" / "alpaca.jsonl"), project_name=str(tmp_path / "py"),
        trainer="sft", peft=True, lora_r=4, max_steps=2, batch_size=2, gradient_accumulation=1, block_size=128,
        model_max_length=256, num_processes=2,
    )  # fmt: skip
    assert folder == tmp_path / "py" and (folder / "tunelab_run.json").is_file()
    assert json.loads((folder / "training_params.json").read_text())["num_processes"] == 2


def test_shipped_multi_node_config_launches_two_machines_of_eight():
    import tunelab

    params = tunelab.load_config(ROOT / "configs" / "multi-node-fsdp.yaml")
    command = launch_command(params, ["--config", "configs/multi-node-fsdp.yaml"])
    assert command[command.index("--config_file") + 1].endswith("fsdp.yaml")
    assert command[command.index("--num_processes") + 1] == "16"
    assert command[command.index("--main_process_ip") + 1] == "10.0.0.1"


@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_sharded_backends_on_a_cpu_machine_are_a_clear_error(backend, tiny_llama, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from tunelab.cli import main

    code = main(
        ["llm", "--train", "--model", str(tiny_llama), "--data-path", str(ROOT / "samples" / "alpaca.jsonl"),
         "--project-name", str(tmp_path / "p"), "--num-processes", "2", "--distributed-backend", backend]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and f"distributed_backend={backend} needs CUDA GPUs" in err and "launching" not in err


def test_a_backend_asked_for_with_one_process_is_said_not_ignored(tiny_llama, tmp_path, capsys):
    """AutoTrain's --distributed-backend uses every GPU; with num_processes 1 tunelab trains in one process, and
    says so instead of ignoring the flag."""
    from tunelab.cli import main

    code = main(
        ["llm", "--train", "--model", str(tiny_llama), "--data-path", str(ROOT / "samples" / "alpaca.jsonl"),
         "--project-name", str(tmp_path / "p"), "--distributed-backend", "ddp", "--max-steps", "1",
         "--block-size", "64"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0 and "distributed_backend ddp with num_processes 1: one process trains" in err


def test_the_hot_path_under_fsdp2_equals_the_plain_model(tiny_llama, tmp_path):
    """accelerate's FSDP2 preparation (fsdp backend) keeps the final norm and the output head gathered from the
    forward to the backward pass, so the chunked loss may read the head's weights after the forward. With the fused
    layers and LoRA forward too, loss and gradients equal the plain model's on 2 CPU processes (gloo), with and
    without a LoRA adapter (on the head as well). (DeepSpeed ZeRO-3 does not keep them: the plain loss there,
    test_training_path.py.)"""
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "fsdp2.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*command, str(ROOT / "tests" / "fsdp2_worker.py"), str(tiny_llama), str(out)],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert all(results.pop("fused")), "the fused forwards were not in use"
    for kind, result in results.items():
        assert result["grads"] == result["fast_grads"] and result["grads"], kind
        assert abs(result["fast"] - result["plain"]) < 1e-5, (kind, result)
        assert result["worst_grad_diff"] < 1e-5, (kind, result)
    assert any("lm_head.lora_B" in name for name in results["lora"]["grads"])
