"""Where a loaded model runs after training: the CUDA GPU when there is one, else the CPU.

Called by every loader in inference/ (generate.load_run, score.load_reward_model, predict.load_classifier, the base
model evaluate compares with), so that generate, chat, serve, evaluate, score and predict all run on the GPU the
machine has. The loaders build models on the CPU (transformers' default without a device_map), and a model left
there on a GPU machine answers tens of times slower than it could.
"""

from __future__ import annotations

from typing import Any


def inference_device() -> Any:
    """torch.device("cuda") when a CUDA GPU is available, else torch.device("cpu")."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_inference_device(model: Any) -> Any:
    """The model moved to inference_device() and in eval mode (returned, as nn.Module.to returns it)."""
    return model.to(inference_device()).eval()
