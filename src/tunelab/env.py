"""Facts about where tunelab runs: what the machine can run (checked before any loading), which process this is
when several train together, and `tunelab env`'s version report. A leaf: it asks, it decides nothing.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import platform

from tunelab.config.base import RunParams
from tunelab.errors import TunelabError

log = logging.getLogger("tunelab")

# Optimizers that exist only as bitsandbytes CUDA kernels.
CUDA_OPTIMIZERS = ("8bit", "paged", "bnb")


def check_machine(params: RunParams) -> None:
    """Raise one TunelabError listing every option this machine cannot run (CUDA-only precision, optimizers,
    quantization), so a user fixes them all at once."""
    import torch

    from tunelab.models.quantize import check_quantization

    cuda = torch.cuda.is_available()
    problems = []
    if params.mixed_precision == "fp16" and not cuda:
        problems.append("mixed_precision=fp16 needs a CUDA GPU (use bf16 or drop mixed_precision)")
    if params.mixed_precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        problems.append("mixed_precision=bf16 is not supported by this GPU (use fp16)")
    if any(marker in params.optimizer for marker in CUDA_OPTIMIZERS) and not cuda:
        problems.append(f"optimizer={params.optimizer} is a bitsandbytes CUDA optimizer (use adamw_torch)")
    if params.use_flash_attention_2 and not cuda:
        problems.append("use_flash_attention_2 needs a CUDA GPU and the flash-attn package")
    if params.log in ("tensorboard", "wandb") and importlib.util.find_spec(params.log) is None:
        problems.append(f"log={params.log} needs the {params.log} package (pip install {params.log})")
    if params.distributed_backend in ("fsdp", "deepspeed") and not cuda:
        problems.append(
            f"distributed_backend={params.distributed_backend} needs CUDA GPUs (on CPU, several processes use ddp)"
        )
    try:
        check_quantization(params.quantization)
    except TunelabError as err:
        problems.append(str(err))
    if problems:
        where = "this machine has no CUDA GPU" if not cuda else "this machine"
        raise TunelabError(f"{where}: " + "; ".join(problems))
    if not cuda:
        _cpu_precision_advice(params)


def cpu_has_bf16() -> bool | None:
    """Whether this CPU multiplies bf16 matrices natively (x86: AVX512-BF16 or AMX); None where torch cannot tell
    (other architectures)."""
    import torch

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes
        return None


def _cpu_precision_advice(params: RunParams) -> None:
    """bf16 on a CPU: about 1.5x float32's speed where the CPU has bf16 instructions (docs/benchmarks.md), but
    emulated, and slower than float32, where it has not. Said before training, either way."""
    native = cpu_has_bf16()
    if params.mixed_precision == "bf16" and native is False:
        log.warning(
            "mixed_precision=bf16 on a CPU without bf16 instructions (AVX512-BF16 or AMX): it is emulated here and "
            "slower than float32; drop mixed_precision to train faster"
        )
    elif params.mixed_precision is None and native:
        log.info(
            "this CPU has bf16 instructions: mixed_precision bf16 can train faster, in less memory, with bf16's "
            "rounding (SmolLM2 with LoRA: 1.5x float32's speed on a 2-core AMD EPYC, docs/benchmarks.md)"
        )


def already_launched() -> bool:
    """True inside processes started by accelerate launch, torchrun or an MPI launcher."""
    return any(int(os.environ.get(name, "1")) > 1 for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"))


def is_main_process() -> bool:
    """The process that writes the run folder and tells the story in the log (rank 0, or the only one)."""
    return int(os.environ.get("RANK", "0")) == 0


def distributed_kind() -> str | None:
    """fsdp / deepspeed when a launched process uses them (accelerate says so in the environment), else None."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    return None


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def versions() -> dict[str, str]:
    """Versions of the packages a run depends on (for `tunelab env` and bug reports)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "device": device_name()}
    for name in ("tunelab", "torch", "transformers", "peft", "accelerate", "datasets", "trl", "gguf"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out
