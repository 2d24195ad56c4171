"""The model step of a run: resolve where the base model is, check it from its config, load it in the right dtype,
add LoRA if asked.

    models/load.py       where a model is (hub id, folder, .gguf) and loading it (GGUF dequantized, cached)
    models/checks.py     settings the model cannot take, found from its config before loading
    models/peft.py       LoRA through PEFT
    models/freeze.py     freeze training: full fine-tuning of some layers or parameters, the rest frozen
    models/vocabulary.py tokens a run adds: in the tokenizer, rows in the embeddings, trained
    models/positions.py  rope_scaling: rotary positions stretched to train longer rows than the model's
    models/quantize.py   int4/int8 (QLoRA, CUDA only)
"""

from __future__ import annotations

import logging
from typing import Any

from tunelab.config.base import RunParams, listed_tokens
from tunelab.models.checks import check_model
from tunelab.models.experts import ROUTER_AUX, Balancing, balancing_loss
from tunelab.models.freeze import check_sharding, freeze, frozen_in_half, is_freezing
from tunelab.models.load import (
    ModelSource,
    load_causal_lm,
    load_config,
    load_sequence_classifier,
    load_tokenizer,
    resolve_model,
)
from tunelab.models.peft import add_lora
from tunelab.models.positions import rope_scaling_of, stretch_model
from tunelab.models.quantize import check_quantization, quantization_config
from tunelab.models.vision import freeze_vision, reads_images
from tunelab.models.vocabulary import embedding_rows, fit_embeddings
from tunelab.speed import attention_implementation, fuse_ops

__all__ = [
    "ModelSource",
    "check_model",
    "half_precision",
    "load_model",
    "load_reference",
    "load_teacher",
    "load_tokenizer",
    "resolve_model",
    "load_config",
    "check_quantization",
]

log = logging.getLogger("tunelab")

NEW_TOKEN_IDS = "tunelab_new_token_ids"  # the model's attribute: ids of the tokens the run added (not those it had)


def half_precision(params: RunParams) -> Any:
    """The torch half dtype the params' mixed precision asks for (bf16/fp16), or None."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(params.mixed_precision or "")


def load_reference(params: RunParams, like: Any = None) -> Any:
    """The reference model named by `model_ref` (dpo, kto, grpo with beta > 0), loaded like the base model (the
    same dtype rules, its positions stretched as the model's where rope_scaling must); the trainer freezes it.
    `like`: the model trained, whose embedding rows it gets (tokens the run added, started as the model's own new
    rows were)."""
    log.info("%s: reference model = %s", params.trainer, params.model_ref)
    reference = _frozen_model(params.model_ref, params)
    if like is not None:  # the new tokens' rows (spare rows, in a padded vocabulary) start where the model's did
        fit_embeddings(reference, embedding_rows(like), getattr(like, NEW_TOKEN_IDS, None))
    return reference


def load_teacher(params: RunParams) -> Any:
    """The teacher of a distill run (`teacher_model`), loaded as a reference model is (the run's precision, its
    positions stretched where rope_scaling must); the trainer freezes it."""
    return _frozen_model(params.teacher_model, params)


def _frozen_model(name: str, params: RunParams) -> Any:
    import torch

    source = resolve_model(name)
    # the run's attention kernels: flash attention's flat batches (training/trainer.py) reach this model too
    attention = attention_implementation(params)
    kwargs = {"attn_implementation": attention} if attention else {}
    model = load_causal_lm(source, dtype=half_precision(params) or torch.float32, **kwargs)
    return stretch_model(model, rope_scaling_of(model.config, params, source.name, required=False))


def route_experts(model: Any, params: RunParams) -> None:
    """Mark a mixture of experts for its load-balancing loss when the run's method adds it (those that read
    router_aux_loss_coef: TRL's SFT, DPO, KTO, GRPO and RLOO trainers do) and the weight is not 0:
    router_aux_loss_coef, else the model's own. The method's trained forward then asks for the router logits
    (GuardedTrainer.routing) and its loss adds the balancing loss (add_balancing), padding left out."""
    from tunelab.methods import readers

    function = balancing_loss(type(model))
    if function is None or getattr(params, "trainer", None) not in readers()["router_aux_loss_coef"]:
        return
    if not hasattr(model, "num_experts") or not hasattr(model, "num_experts_per_tok"):
        return
    given = getattr(params, "router_aux_loss_coef", None)
    own = getattr(model, "router_aux_loss_coef", None)  # the model's (DBRX's from its ffn_config), else the config's
    own = getattr(model.config.get_text_config(), "router_aux_loss_coef", 0.0) if own is None else own
    weight = float(own or 0.0) if given is None else float(given)
    if weight:
        setattr(model, ROUTER_AUX, Balancing(weight, function, int(model.num_experts), int(model.num_experts_per_tok)))


def load_model(
    source: ModelSource,
    params: RunParams,
    kind: str = "causal_lm",
    tokenizer: Any = None,
    labels: list[str] | None = None,
    new_token_ids: list[int] | None = None,
) -> Any:
    """Base model for training: fp32 weights for full fine-tuning (mixed precision autocasts), the half type for
    LoRA under mixed precision (the frozen base never needs fp32), int4/int8 for QLoRA.

    kind "reward": a sequence classifier with one output; kind "classifier": one output per label, named in the
    config. Both get the tokenizer's pad token, which they need to find each row's last token (decoder models
    such as GPT-2 and Llama have none of their own: the tokenizer's is EOS). `new_token_ids`: the tokens the run
    added to the tokenizer (models/vocabulary.py), whose rows start at the mean of the others'."""
    import torch

    half = half_precision(params)
    # A freeze run's frozen weights stay in the half type as a LoRA run's frozen base does (its trained ones are
    # made fp32 below); not when sharded: FSDP and DeepSpeed shard a layer's weights in one dtype.
    check_sharding(params)
    frozen_half = half if frozen_in_half(params) else None
    dtype = half if ((params.peft or frozen_half is not None) and half is not None) else torch.float32
    kwargs: dict[str, Any] = {}
    attention = attention_implementation(params)
    if attention:
        kwargs["attn_implementation"] = attention
    quantization = quantization_config(params.quantization, half)
    if kind == "causal_lm":
        model = load_causal_lm(source, dtype=dtype, quantization_config=quantization, **kwargs)
    else:
        num_labels = len(labels) if labels else 1
        model = load_sequence_classifier(source, num_labels, dtype=dtype, quantization_config=quantization, **kwargs)
        if labels:
            model.config.id2label = dict(enumerate(labels))
            model.config.label2id = {label: i for i, label in enumerate(labels)}
        if tokenizer is not None:
            model.config.pad_token_id = tokenizer.pad_token_id
    stretch_model(model, rope_scaling_of(model.config, params, source.name))
    model.config.use_cache = False  # the KV cache is useless while training and conflicts with checkpointing
    route_experts(model, params)
    token_ids = []
    if tokenizer is not None and (listed := listed_tokens(params)):  # rows for the tokens the run added
        fit_embeddings(model, len(tokenizer), new_token_ids)
        token_ids = tokenizer.convert_tokens_to_ids(listed)
        setattr(model, NEW_TOKEN_IDS, list(new_token_ids or []))  # for a model_ref's rows (load_reference)
    if params.peft:
        model = add_lora(model, params, "CAUSAL_LM" if kind == "causal_lm" else "SEQ_CLS", token_ids)
    elif is_freezing(params):
        choice = freeze(model, params, frozen_half)
        log.info("freeze training: %s train, from decoder layer %d of %d on", choice.describe(), choice.first_layer,
                 choice.layers)  # fmt: skip
    elif kind == "causal_lm" and reads_images(model.config):
        freeze_vision(model)
    fuse_ops(model, params)
    return model
