"""Scaling out through accelerate: 2 CPU processes (gloo) with per-device batch b train exactly like 1 process with
batch 2b, and write one run folder; a checkpoint is marked complete only once every process has written its part;
a stop signal to the launching process stops the launched ones; the shipped FSDP and DeepSpeed configs are accepted
by accelerate's parser."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import SHARED_DATA, read_metrics, train_losses
from tunelab.launch import CONFIGS, launch_command
from tunelab.training.checkpoints import COMPLETE_MARK, last_complete_checkpoint, mark_complete

ROOT = Path(__file__).resolve().parents[1]


def _environment(hooks: Path | None = None) -> dict[str, str]:
    """The launching process's environment; `hooks`: a folder with a sitecustomize.py every process imports."""
    paths = [str(hooks)] if hooks else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, str(ROOT / "src")])}
    env.pop("WORLD_SIZE", None)
    return env


def _tunelab(*args: str, hooks: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tunelab.cli", *args], env=_environment(hooks), capture_output=True, text=True,
        timeout=600, cwd=ROOT,
    )  # fmt: skip


def _train_args(model: Path, project: Path, batch: int, *extra: str, peft: tuple = ("--peft",)) -> list[str]:
    # 1,500 rows when ../shared is there: more than one length-grouped "megabatch", so the batch order itself is
    # put to the test (it must not depend on the number of processes).
    data = SHARED_DATA / "alpaca" / "train.jsonl"
    data = data if data.is_file() else ROOT / "samples" / "alpaca.jsonl"
    return [
        "llm", "--train", "--model", str(model), "--data-path", str(data),
        "--project-name", str(project), "--trainer", "sft", *peft, "--lora-r", "8", "--lora-dropout", "0",
        "--lr", "2e-3", "--batch-size", str(batch), "--gradient-accumulation", "2", "--max-steps", "6",
        "--logging-steps", "1", "--block-size", "128", "--model-max-length", "256", "--save-steps", "3",
        *extra,
    ]  # fmt: skip


def _run(
    model: Path, project: Path, batch: int, *extra: str, peft: tuple = ("--peft",), hooks: Path | None = None
) -> subprocess.CompletedProcess:
    return _tunelab(*_train_args(model, project, batch, *extra, peft=peft), hooks=hooks)


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


# Imported by every process of the run (sitecustomize.py): in the launched ones, process 1 is slow to write its
# random state into a checkpoint, and process 0 kills itself (SIGKILL) as soon as the checkpoint of step
# TUNELAB_TEST_KILL_AT is saved, as in a crash.
SLOW_SECOND_PROCESS = """
import os
if os.environ.get("RANK") is not None and os.environ.get("TUNELAB_TEST_KILL_AT"):
    import signal, time
    from transformers import Trainer
    from tunelab.training.callbacks import ProgressAndMetrics

    kill_at = int(os.environ["TUNELAB_TEST_KILL_AT"])
    if os.environ["RANK"] == "1":
        save_rng_state = Trainer._save_rng_state

        def slow_save_rng_state(self, output_dir):
            time.sleep(5)
            save_rng_state(self, output_dir)

        Trainer._save_rng_state = slow_save_rng_state
    else:
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        ProgressAndMetrics.on_save = on_save
"""


@pytest.mark.slow
def test_a_checkpoint_is_marked_complete_once_every_process_has_written_its_part(tiny_llama, tmp_path, monkeypatch):
    """The main process marked a checkpoint complete as soon as its own files were written: another process still
    writing its random state when the run crashed left a checkpoint marked complete without it, which a resume
    trusted (transformers then resumes that process with a fresh random state, saying so at info level only)."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_SECOND_PROCESS, encoding="utf-8")
    monkeypatch.setenv("TUNELAB_TEST_KILL_AT", "3")
    project = tmp_path / "two"
    crashed = _run(tiny_llama, project, 2, "--num-processes", "2", hooks=hooks)
    assert crashed.returncode != 0 and "launching 2 processes" in crashed.stderr, crashed.stderr[-3000:]
    staging = tmp_path / ".two.partial"
    checkpoint = staging / "checkpoint-3"
    assert not project.exists() and (checkpoint / COMPLETE_MARK).is_file(), crashed.stderr[-3000:]
    assert sorted(p.name for p in checkpoint.glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]
    assert last_complete_checkpoint(staging) == checkpoint
    # Without process 1's random state it is not resumed from
    (checkpoint / "rng_state_1.pth").unlink()
    assert last_complete_checkpoint(staging) is None


def test_a_checkpoint_of_two_processes_without_the_second_ones_random_state_is_not_resumed_from(tmp_path, caplog):
    """The mark says how many processes wrote the checkpoint, and which files it had: one that lacks a process's
    random state (or any file of its list) is passed over, with a line saying why."""
    from tunelab.training.checkpoints import missing

    staging = tmp_path / ".run.partial"
    files = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state_0.pth")
    for step in (3, 6, 9):
        checkpoint = staging / f"checkpoint-{step}"
        checkpoint.mkdir(parents=True)
        for name in files:
            (checkpoint / name).write_bytes(b"x" * 16)
        if step != 9:  # checkpoint-9 marked before process 1 wrote its file (the mark still asks for it)
            (checkpoint / "rng_state_1.pth").write_bytes(b"x" * 16)
        mark_complete(checkpoint, world_size=2)
    newer, older = staging / "checkpoint-6", staging / "checkpoint-3"
    assert missing(staging / "checkpoint-9") == ["rng_state_1.pth (the random state of process 1 of 2) is missing"]
    assert last_complete_checkpoint(staging) == newer
    (newer / "rng_state_1.pth").unlink()
    (older / "optimizer.pt").write_bytes(b"x" * 8)
    with caplog.at_level(logging.WARNING, logger="tunelab"):
        assert last_complete_checkpoint(staging) is None
    said = caplog.text
    assert "checkpoint-6 is marked complete but rng_state_1.pth (the random state of process 1 of 2) is" in said
    assert "not resumed from (with several machines, the run folder must be on a disk all of them write" in said
    assert "checkpoint-3 is marked complete but optimizer.pt has 8 bytes, not the 16 it was written with" in said


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


RANK_SCRIPT = """
import json
import os
import sys

import tunelab
from scoring.lengths import length  # a package beside this script: not where the launched processes start


def rank(completions, **kwargs):
    return [float(os.environ.get("RANK", "0"))] * len(completions)


# (the package's reward first: the launched processes must find it before importing this script puts its folder on
# their path)
if __name__ == "__main__":
    tunelab.train(**json.loads(sys.argv[1]), reward_functions=[length, rank])
"""


def _script(folder: Path, guarded: bool = True) -> Path:
    (folder / "scoring").mkdir(parents=True)
    (folder / "scoring" / "__init__.py").write_text("")
    (folder / "scoring" / "lengths.py").write_text(
        "def length(completions, **kwargs):\n    return [float(len(c)) for c in completions]\n"
    )
    source = RANK_SCRIPT if guarded else RANK_SCRIPT.replace('if __name__ == "__main__":\n    ', "")
    (folder / "train.py").write_text(source)
    return folder / "train.py"


@pytest.mark.slow
def test_two_grpo_processes_log_the_figures_of_both(tiny_llama, tmp_path):
    """Each process samples and scores its own prompts: what the run logs is every process's, as TRL gathers it
    (a reward that is each process's rank logs 0.5, not process 0's 0), and the collectives of the whole step's
    reward scaling and of the entropy mask run in step on both processes. The rewards are functions a Python script
    hands to tunelab.train: its own (the launched processes import the script, which keeps its training under a
    __main__ guard) and one of a package beside it (found by the launched processes too)."""
    prompts = [{"prompt": f"What is {a} + {b}?"} for a, b in [(2, 3), (4, 1), (6, 2), (1, 1)]]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    script = _script(tmp_path / "mine")
    settings = {
        "trainer": "grpo", "model": str(tiny_llama), "data_path": str(data), "project_name": str(tmp_path / "run"),
        "num_generations": 2, "batch_size": 1, "gradient_accumulation": 1, "max_completion_length": 6,
        "max_steps": 2, "peft": True, "logging_steps": 1, "num_processes": 2, "scale_rewards": "batch",
        "top_entropy_quantile": 0.5, "entropy_coef": 0.01,
    }  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(script), json.dumps(settings)], env=_environment(), capture_output=True, text=True,
        timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(records) == 2
    for record in records:
        assert record["rewards/rank/mean"] == pytest.approx(0.5)
        assert record["rewards/length/mean"] > 0
        assert record["entropy"] > 0 and "clip_ratio/region_mean" in record


def test_a_script_s_own_reward_without_a_main_guard_is_refused_before_any_process_starts(tiny_llama, tmp_path):
    """Each launched process imports the script for its function: without `if __name__ == "__main__":` that would
    start the training again in every one of them. Said in one line, before anything is launched."""
    script = _script(tmp_path / "mine", guarded=False)
    settings = {"trainer": "grpo", "model": str(tiny_llama), "data_path": "unread.jsonl", "num_processes": 2}
    done = subprocess.run(
        [sys.executable, str(script), json.dumps(settings)], env=_environment(), capture_output=True, text=True,
        timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 1
    assert f"ConfigError: with several processes: {script}:rank: each launched process imports train.py" in done.stderr
    assert "accelerate" not in done.stderr


RANK_TOOL = """
import os
from pathlib import Path


def add(a: int, b: int) -> str:
    \"\"\"Add two whole numbers.

    Args:
        a: the first number
        b: the second number
    \"\"\"
    rank = os.environ.get("RANK", "0")
    with open(Path(__file__).with_suffix(f".rounds{rank}"), "a") as out:
        out.write("1\\n")
    return str(a + b) + " x" * 50 * int(rank)  # process 1's result turn is longer: it runs out of room a round early


def turns(completions, **kwargs):
    return [float(len(c)) for c in completions]
"""


def test_two_processes_with_tools_call_them_in_step(tiny_llama, tmp_path):
    """tools on two processes, each completion forced to call `add` again and again: process 1's longer results
    leave it no room for a second round where process 0 has one. The processes still sample in step (a sharded
    model's generate needs both: the idle one samples beside the other) and the run trains."""
    from transformers import AutoTokenizer

    from tests.test_tools import CALL, _forcing

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a} + 2?"}) + "\n" for a in range(4)))
    (tmp_path / "mine.py").write_text(RANK_TOOL)
    bias = json.dumps({"sequence_bias": _forcing(AutoTokenizer.from_pretrained(tiny_llama), CALL)})
    done = _tunelab(
        "llm", "--train", "--trainer", "grpo", "--model", str(tiny_llama), "--data-path", str(data),
        "--project-name", str(tmp_path / "run"), "--reward-functions", f"{tmp_path / 'mine.py'}:turns",
        "--tools", f"{tmp_path / 'mine.py'}:add", "--chat-template", "chatml", "--generation-kwargs", bias,
        "--num-generations", "2", "--batch-size", "1", "--gradient-accumulation", "1",
        "--max-completion-length", "160", "--max-steps", "1", "--peft", "--logging-steps", "1",
        "--num-processes", "2", "--max-prompt-length", "640",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    calls = [len((tmp_path / f"mine.rounds{rank}").read_text().splitlines()) for rank in (0, 1)]
    assert calls == [2 * 2, 2 * 1]  # 2 completions each: two rounds on process 0, one on process 1
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(records) == 1 and records[0]["tools/call_frequency"] == pytest.approx(1.5)


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
    for _ in range(2):
        done = subprocess.run(
            [*command, str(ROOT / "tests" / "fsdp2_worker.py"), str(tiny_llama), str(out)],
            env=env, capture_output=True, text=True, timeout=300, cwd=ROOT,
        )  # fmt: skip
        # Once in three whole-suite runs (session 20) a gloo process aborted in C++ ("terminate called without an
        # active exception") before any result; passing again at once, 3 of 3. One more try for that abort only.
        if done.returncode == 0 or "terminate called without an active exception" not in done.stderr:
            break
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert all(results.pop("fused")), "the fused forwards were not in use"
    for kind, result in results.items():
        assert result["grads"] == result["fast_grads"] and result["grads"], kind
        assert abs(result["fast"] - result["plain"]) < 1e-5, (kind, result)
        assert result["worst_grad_diff"] < 1e-5, (kind, result)
    assert any("lm_head.lora_B" in name for name in results["lora"]["grads"])


@pytest.mark.slow
def test_sigterm_to_the_launching_process_stops_the_launched_ones(tiny_llama, tmp_path):
    """A job scheduler's `kill PID` reaches the tunelab process alone: it passes the signal on to accelerate launch,
    which stops its processes (they run in sessions of their own), and ends with its exit code. Before, tunelab died
    alone and the two processes trained on, orphaned."""
    import psutil

    project = tmp_path / "long"
    args = _train_args(tiny_llama, project, 2, "--num-processes", "2", "--max-steps", "100000", "--save-steps", "50")
    log_file = tmp_path / "log.txt"
    with log_file.open("w") as log:
        parent = subprocess.Popen(
            [sys.executable, "-m", "tunelab.cli", *args], env=_environment(), cwd=ROOT, stdout=log, stderr=log
        )
    launched: list = []
    try:
        deadline = time.monotonic() + 300
        metrics = tmp_path / ".long.partial" / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().strip()):  # both processes are training
            assert parent.poll() is None and time.monotonic() < deadline, log_file.read_text()[-3000:]
            time.sleep(0.5)
        launcher = psutil.Process(parent.pid).children()
        assert len(launcher) == 1 and "accelerate.commands.launch" in " ".join(launcher[0].cmdline())
        workers = launcher[0].children()
        launched = [*launcher, *workers]
        assert len(workers) == 2 and all("tunelab.cli" in " ".join(w.cmdline()) for w in workers)

        os.kill(parent.pid, signal.SIGTERM)
        code = parent.wait(timeout=120)
        _, alive = psutil.wait_procs(launched, timeout=60)
        said = log_file.read_text()
        assert alive == [], said[-3000:]
        assert code == 128 + signal.SIGTERM, said[-3000:]  # accelerate launch's exit code
        assert "stopped by SIGTERM" in said
        assert not any(folder.joinpath("tunelab_run.json").exists() for folder in (project, metrics.parent))
    finally:
        for process in launched:  # what is left of the processes this test started, on a failure
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        if parent.poll() is None:
            parent.kill()
        parent.wait(timeout=60)
