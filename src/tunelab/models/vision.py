"""Vision-language models (Qwen2-VL, LLaVA, SmolVLM, Gemma 3...): a language model that also reads images, trained
by sft on chats that show them (data/images.py).

transformers builds them with AutoModelForImageTextToText where they have no causal-LM class of their own; their
processor (the tokenizer and the image processor together) comes from the same folder. Only the language model
trains: LoRA adapts its linear layers alone, and a full fine-tune leaves the vision tower and the projector frozen
(LLaMA-Factory's defaults, and what a small image dataset can train without losing what the tower sees).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

from tunelab.errors import ConfigError, TunelabError

log = logging.getLogger("tunelab")


def is_vision_language(config: Any) -> bool:
    """A model transformers builds only as image-text-to-text (Gemma 3 and a few others are causal LMs too: those
    load as such, images and all)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    return type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING and type(config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING


def reads_images(config: Any) -> bool:
    """The model takes images (a vision config beside its text one)."""
    return is_vision_language(config) or getattr(config, "vision_config", None) is not None


def language_model_class(config: Any) -> Any:
    """The auto class that builds a model of this config with its language-model head."""
    import transformers

    return (
        transformers.AutoModelForImageTextToText if is_vision_language(config) else transformers.AutoModelForCausalLM
    )


def load_processor(source: Any, max_pixels: int | None = None, min_pixels: int | None = None) -> Any:
    """The processor (tokenizer and image processor) of a models/load.ModelSource, its images held to `max_pixels`
    and `min_pixels` when given (image_max_pixels, image_min_pixels: fit_pixels); TunelabError when it has none."""
    from transformers import AutoProcessor

    if source.gguf_file:
        raise TunelabError(
            f"model {source.name}: a GGUF file holds no vision tower: train a vision-language model from its folder"
        )
    try:
        processor = AutoProcessor.from_pretrained(source.path)
    except Exception as err:  # noqa: BLE001 - whatever the processor's own code raises, said in one line
        from transformers.utils import is_torchvision_available

        hint = "" if is_torchvision_available() else "; Qwen2-VL's and SmolVLM's processors need torchvision"
        raise TunelabError(f"model {source.name}: its processor cannot be loaded ({err}){hint}") from None
    if max_pixels is not None or min_pixels is not None:
        fit_pixels(processor, max_pixels, min_pixels)
    return processor


EDGES = ("shortest_edge", "longest_edge")  # a pixel-budget image processor's least and most pixels


def fit_pixels(processor: Any, max_pixels: int | None, min_pixels: int | None) -> None:
    """The image processor set to scale each image into [min_pixels, max_pixels] pixels before counting its tokens:
    those whose tokens follow an image's pixel count (Qwen2-VL's family: `size` holds the pixel budget as
    shortest_edge / longest_edge, a token per merged patch). Saved with the processor, so a run's later prompts are
    sized as its training images were. ConfigError for an image processor that sizes images otherwise."""
    images = processor.image_processor
    size = getattr(images, "size", None)
    budget = tuple(size.get(edge) if isinstance(size, dict) else getattr(size, edge, None) for edge in EDGES)
    if getattr(images, "merge_size", None) is None or None in budget:
        raise ConfigError(
            f"image_max_pixels / image_min_pixels: the model's image processor ({type(images).__name__}) sizes images "
            "its own way (a fixed size, or tiles), not by a pixel budget: leave them unset"
        )
    low, high = min_pixels or budget[0], max_pixels or budget[1]
    if low > high:
        raise ConfigError(
            f"image_min_pixels ({low}) is larger than the most pixels an image keeps ({high}): lower it, or set "
            "image_max_pixels"
        )
    if dataclasses.is_dataclass(size):
        images.size = dataclasses.replace(size, shortest_edge=low, longest_edge=high)
    else:
        images.size = {**size, "shortest_edge": low, "longest_edge": high}
    log.info("images: each scaled to between %d and %d pixels (image_min_pixels, image_max_pixels)", low, high)


def language_root(model: Any) -> str | None:
    """The name of the module that holds the language model's decoder layers (`model.language_model`), or None."""
    from tunelab.models.freeze import decoder_layers

    found = decoder_layers(model)
    return found[0].rpartition(".")[0] if found else None


def lora_targets(model: Any, targets: str | list[str]) -> str | list[str]:
    """LoRA targets held to the language model of a vision-language model (PEFT's all-linear, or the names given,
    would also adapt the vision tower's layers), as a regular expression on module names; a text model's unchanged."""
    from torch import nn

    root = language_root(model) if reads_images(model.config) else None
    if root is None:
        return targets
    if targets == "all-linear":
        linear = [key for key, m in model.get_submodule(root).named_modules() if isinstance(m, nn.Linear)]
        names = list(dict.fromkeys(key.rsplit(".", 1)[-1] for key in linear))
    else:
        names = list(targets)
    return rf"{re.escape(root)}\..*\.({'|'.join(re.escape(name) for name in names)})"


def freeze_vision(model: Any) -> int:
    """A full fine-tune of a vision-language model: everything but the language model and its output head frozen
    (the vision tower, the projector). Returns how many parameters were frozen."""
    root = language_root(model)
    if root is None:
        return 0
    head = {id(p) for p in model.get_output_embeddings().parameters()}
    frozen = 0
    for name, parameter in model.named_parameters():
        if not (name == root or name.startswith(root + ".")) and id(parameter) not in head:
            parameter.requires_grad_(False)
            frozen += parameter.numel()
    log.info("vision-language model: the vision tower and projector stay frozen (%s parameters)", f"{frozen:,}")
    return frozen


_TOWER_SIZES: dict[str, int] = {}


def tower_parameters(config: Any) -> int:
    """The parameters of a vision-language model beside its language model (vision tower, projector), which the
    memory estimate's language-model shapes leave out; 0 for a text model. Counted on a skeleton on the meta device,
    once per config."""
    import torch

    if not reads_images(config):
        return 0
    key = config.to_json_string()
    if key not in _TOWER_SIZES:
        with torch.device("meta"):
            model = language_model_class(config).from_config(config)
        root = language_root(model)
        head = {id(p) for p in model.get_output_embeddings().parameters()}
        _TOWER_SIZES[key] = sum(
            p.numel()
            for name, p in model.named_parameters()
            if root and not (name == root or name.startswith(root + ".")) and id(p) not in head
        )
    return _TOWER_SIZES[key]
