"""Scaling out: the `accelerate launch` command that runs a job in several processes. A leaf of the package.

tunelab never manages processes itself. `num_processes > 1` (or `num_machines > 1`) turns
`tunelab llm --train ...` into `accelerate launch --config_file <backend config> ... -m tunelab.cli llm --train ...`
with the same arguments (tasks/__init__.train decides, after running the checks once); inside the launched
processes (WORLD_SIZE is set) the run goes ahead as usual and transformers' Trainer, through accelerate, does DDP,
FSDP or DeepSpeed. A user's own `accelerate launch` or `torchrun` works the same way: tunelab sees it is already
launched (env.already_launched).

The configs for each backend ship in `tunelab/accelerate_configs/` (docs/scaling.md shows them);
`accelerate_config` replaces them with the user's own.

A SIGTERM, SIGINT or SIGHUP to the launching process (a job scheduler's `kill PID`, Ctrl-C) is passed on to
`accelerate launch`, whose agent (torch's elastic agent) stops the processes it started: they run in sessions of
their own, where no signal to the launching process or its group reaches them.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from tunelab.config.base import RunParams
from tunelab.env import already_launched

log = logging.getLogger("tunelab")
CONFIGS = Path(__file__).parent / "accelerate_configs"
# After a stop signal is passed on: accelerate's agent gives its processes 30 s to end before it SIGKILLs them.
STOP_GRACE_SECONDS = 60.0
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))
BACKEND_CONFIGS = {
    None: "ddp.yaml",
    "ddp": "ddp.yaml",
    "fsdp": "fsdp.yaml",
    "deepspeed": "deepspeed_zero3_offload.yaml",
}


def wants_launch(params: RunParams) -> bool:
    """Whether to launch processes; a distributed_backend asked for with one process is said, not ignored."""
    launching = (params.num_processes > 1 or params.num_machines > 1) and not already_launched()
    if params.distributed_backend and not launching and not already_launched():
        log.warning(
            "distributed_backend %s with num_processes 1: one process trains, unsharded (AutoTrain would use every "
            "GPU): set num_processes to the number of GPUs to shard or replicate across them",
            params.distributed_backend,
        )
    return launching


def config_file(params: RunParams) -> Path:
    if params.accelerate_config:
        return Path(params.accelerate_config).expanduser()
    return CONFIGS / BACKEND_CONFIGS[params.distributed_backend]


def launch_command(params: RunParams, argv: list[str]) -> list[str]:
    """The accelerate launch command running `tunelab <argv>` in num_processes x num_machines processes."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(config_file(params)),
        "--num_processes", str(params.num_processes * params.num_machines),
        "--num_machines", str(params.num_machines),
        "--machine_rank", str(params.machine_rank),
        "--main_process_port", str(params.main_process_port),
        "--mixed_precision", "no",  # the Trainer applies tunelab's mixed_precision itself
        "--dynamo_backend", "no",
    ]  # fmt: skip
    if params.main_process_ip:
        command += ["--main_process_ip", params.main_process_ip]
    return [*command, "-m", "tunelab.cli", *argv]


def launch(params: RunParams, argv: list[str], extra_env: dict[str, str] | None = None) -> int:
    """Run the job in several processes and return their exit code."""
    import torch

    command = launch_command(params, argv)
    env = {**os.environ, **(extra_env or {})}
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"  # processes on CPU talk over gloo
    log.info(
        "launching %d processes on %d machine(s) with accelerate (%s)",
        params.num_processes * params.num_machines,
        params.num_machines,
        config_file(params).name,
    )
    return run_until_stopped(command, env)


def run_until_stopped(command: list[str], env: dict[str, str], grace: float = STOP_GRACE_SECONDS) -> int:
    """Run `command` (accelerate launch) and return its exit code; a stop signal to this process is passed on to it.

    A SIGTERM, SIGINT or SIGHUP to this process alone (a job scheduler's `kill PID`) would otherwise end it and
    leave the launched processes training on their own: they run in sessions of their own, out of reach of a signal
    to this process's group too, and only accelerate's agent stops them. Passed on, the agent stops them and exits;
    after `grace` seconds whatever is left is SIGKILLed. Then this process ends as the signal asked, with the
    launcher's exit code (SIGINT: KeyboardInterrupt, which the CLI turns into exit code 130). Signals can be caught
    in the main thread only: called from another thread (the Python API in a worker thread), none is.
    """
    received: list[int] = []
    process: subprocess.Popen | None = None
    timer: threading.Timer | None = None

    def pass_on(signum: int, frame: object) -> None:
        nonlocal timer
        received.append(signum)
        if process is None:
            return  # not started yet: passed on once it is
        process.send_signal(signum)  # nothing when it has ended already
        if timer is None:
            timer = threading.Timer(grace, _kill_all, (process,))
            timer.daemon = True
            timer.start()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, pass_on) for sig in STOP_SIGNALS}
    try:
        process = subprocess.Popen(command, env=env)
        if received:  # a signal while it started
            pass_on(received[-1], None)
        code = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if timer is not None:
            timer.cancel()
    if not received or code == 0:
        return code
    signum = received[0]
    code = code if code > 0 else 128 + (-code or signum)  # killed by a signal: the shell's way of saying so
    log.warning(
        "stopped by %s: the launched processes have ended (exit code %d); run the same command again to resume "
        "from the last complete checkpoint",
        signal.Signals(signum).name,
        code,
    )
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(code)


def _kill_all(process: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it (its workers run in sessions of their own)."""
    if kill_with_descendants([process.pid]):
        log.warning("the launched processes did not end in time: killed them (SIGKILL)")


def kill_with_descendants(pids: list[int]) -> int:
    """SIGKILL these processes and every process under them, all found before any is killed (a killed parent's
    children go to init, out of the search); returns how many there were. A distributed run's workers are such
    descendants in sessions of their own, which no signal to a process group reaches."""
    import psutil  # accelerate's own dependency

    found = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            found += [process, *process.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    for each in found:
        try:
            each.kill()
        except psutil.NoSuchProcess:
            pass
    return len(found)
