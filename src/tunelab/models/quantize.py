"""int4 / int8 loading through bitsandbytes (QLoRA). CUDA only: anywhere else a clear error, before loading."""

from __future__ import annotations

from typing import Any

from tunelab.errors import TunelabError


def check_quantization(quantization: str | None) -> None:
    """Fail early, naming what is missing, when int4/int8 cannot run on this machine."""
    if quantization is None:
        return
    import torch

    if not torch.cuda.is_available():
        raise TunelabError(
            f"quantization={quantization} needs a CUDA GPU (bitsandbytes; drop quantization to train "
            "the LoRA adapter on the unquantized model)"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise TunelabError(f"quantization={quantization} needs bitsandbytes: pip install 'tunelab[gpu]'") from None


def quantization_config(quantization: str | None, compute_dtype: Any) -> Any:
    """The transformers BitsAndBytesConfig for int4 (NF4, double quant) or int8, or None."""
    if quantization is None:
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "int4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)
