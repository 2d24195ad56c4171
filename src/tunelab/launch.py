"""Scaling out: a run asked to use several processes re-launches itself through `accelerate launch`.

tunelab never manages processes itself. `num_processes > 1` (or `num_machines > 1`) turns
`tunelab llm --train ...` into `accelerate launch --config_file <backend config> ... -m tunelab.cli llm --train ...`
with the same arguments; inside the launched processes (WORLD_SIZE is set) the run goes ahead as usual and
transformers' Trainer, through accelerate, does DDP, FSDP or DeepSpeed. A user's own `accelerate launch` or
`torchrun` works the same way: tunelab sees it is already launched.

The configs for each backend ship in `tunelab/accelerate_configs/` (docs/scaling.md shows them);
`accelerate_config` replaces them with the user's own.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("tunelab")
CONFIGS = Path(__file__).parent / "accelerate_configs"
BACKEND_CONFIGS = {
    None: "ddp.yaml",
    "ddp": "ddp.yaml",
    "fsdp": "fsdp.yaml",
    "deepspeed": "deepspeed_zero3_offload.yaml",
}


def already_launched() -> bool:
    """True inside processes started by accelerate launch, torchrun or an MPI launcher."""
    return any(int(os.environ.get(name, "1")) > 1 for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"))


def wants_launch(params: Any) -> bool:
    return (params.num_processes > 1 or params.num_machines > 1) and not already_launched()


def config_file(params: Any) -> Path:
    if params.accelerate_config:
        return Path(params.accelerate_config).expanduser()
    return CONFIGS / BACKEND_CONFIGS[params.distributed_backend]


def launch_command(params: Any, argv: list[str]) -> list[str]:
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


def launch(params: Any, argv: list[str], extra_env: dict[str, str] | None = None) -> int:
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


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def distributed_kind() -> str | None:
    """fsdp / deepspeed when a launched process uses them (accelerate says so in the environment), else None."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    return None


def check_first(params: Any) -> None:
    """The data and parameter checks of a run, once, before several processes start (they would each fail alike)."""
    from tunelab.config.text_classification import TextClassificationParams

    if isinstance(params, TextClassificationParams):
        from tunelab.classify import prepare
    else:
        from tunelab.run import prepare
    prepare(params)


def launch_params(params: Any) -> Path:
    """`tunelab.train(...)` asked for several processes: write the parameters as a flat tunelab config and launch
    `tunelab --config` with it (the token travels in the environment, never in the file)."""
    import tempfile

    import yaml

    from tunelab.config.text_classification import TextClassificationParams
    from tunelab.errors import TunelabError

    check_first(params)
    values = params.to_dict(redact=True)
    values.pop("token", None)
    if isinstance(params, TextClassificationParams):
        values["task"] = "text_classification"
    with tempfile.TemporaryDirectory(prefix="tunelab-launch-") as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(yaml.safe_dump(values), encoding="utf-8")
        code = launch(params, ["--config", str(config)], {"HF_TOKEN": params.token} if params.token else None)
    if code:
        raise TunelabError(f"the distributed run failed (exit code {code}; the processes' messages are above)")
    return Path(os.path.expanduser(params.project_name)).absolute()
