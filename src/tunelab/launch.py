"""Scaling out: the `accelerate launch` command that runs a job in several processes. A leaf of the package.

tunelab never manages processes itself. `num_processes > 1` (or `num_machines > 1`) turns
`tunelab llm --train ...` into `accelerate launch --config_file <backend config> ... -m tunelab.cli llm --train ...`
with the same arguments (tasks/__init__.train decides, after running the checks once); inside the launched
processes (WORLD_SIZE is set) the run goes ahead as usual and transformers' Trainer, through accelerate, does DDP,
FSDP or DeepSpeed. A user's own `accelerate launch` or `torchrun` works the same way: tunelab sees it is already
launched (env.already_launched).

The configs for each backend ship in `tunelab/accelerate_configs/` (docs/scaling.md shows them);
`accelerate_config` replaces them with the user's own.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from tunelab.config.base import RunParams
from tunelab.env import already_launched

log = logging.getLogger("tunelab")
CONFIGS = Path(__file__).parent / "accelerate_configs"
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
    return subprocess.run(command, env=env).returncode
