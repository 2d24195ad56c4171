"""Wrapping a model with a LoRA adapter (PEFT), including k-bit preparation for QLoRA."""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunelab.config.base import RunParams, module_values

log = logging.getLogger("tunelab")


def target_modules(spec: str | None) -> str | list[str]:
    """'all-linear' (PEFT's shortcut: every linear layer but the output head) or a comma-separated list."""
    if spec is None or spec.strip() in ("", "all-linear", "all_linear"):
        return "all-linear"
    return [name.strip() for name in spec.split(",") if name.strip()]


def lora_config(
    params: RunParams, task_type: str = "CAUSAL_LM", trainable_tokens: dict[str, list[int]] | None = None
) -> Any:
    """The PEFT LoraConfig the params describe (also handed to TRL by the benchmark, so both sides match);
    `trainable_tokens`: embedding rows trained beside the adapter (vocabulary.trainable_tokens)."""
    from peft import LoraConfig

    extra: dict[str, Any] = {}
    if params.modules_to_save:
        extra["modules_to_save"] = saved_whole(params)
    if trainable_tokens:
        extra["trainable_token_indices"] = trainable_tokens
    return LoraConfig(
        r=params.lora_r,
        lora_alpha=params.lora_alpha,
        lora_dropout=params.lora_dropout,
        target_modules=target_modules(params.target_modules),
        bias="none",
        task_type=task_type,
        use_dora=params.use_dora,
        use_rslora=params.use_rslora,
        init_lora_weights=INIT_LORA_WEIGHTS[params.init_lora_weights],
        rank_pattern=module_values(params, "lora_rank_pattern"),
        alpha_pattern=module_values(params, "lora_alpha_pattern"),
        **extra,
    )


# init_lora_weights as tunelab names it -> PEFT's value ("default" is PEFT's True: Kaiming A, zero B).
INIT_LORA_WEIGHTS: dict[str, Any] = {
    "default": True,
    "gaussian": "gaussian",
    "pissa": "pissa",
    "olora": "olora",
}
# These start from a decomposition of the base weights and leave the base changed (the residual): the adapter is
# saved converted to a plain LoRA of the original base (rank 2r), so anything that loads base + adapter is right.
CHANGES_BASE = ("pissa", "olora")


def saved_whole(params: RunParams) -> list[str]:
    """modules_to_save as a list of module names."""
    return [name.strip() for name in (params.modules_to_save or "").split(",") if name.strip()]


def add_lora(model: Any, params: RunParams, task_type: str = "CAUSAL_LM", token_ids: list[int] | None = None) -> Any:
    """Freeze the model and add a LoRA adapter as the params describe; `token_ids`: the tokens a run added, whose
    embedding rows are trained beside it (vocabulary.py)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    from tunelab.models.vision import lora_targets, reads_images
    from tunelab.models.vocabulary import trainable_tokens

    if params.quantization is not None:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=not params.disable_gradient_checkpointing
        )
    trained_tokens = trainable_tokens(
        model, token_ids or [], saved_whole(params), target_modules(params.target_modules)
    )
    config = lora_config(params, task_type, trained_tokens)
    if reads_images(model.config):  # the language model's layers, not the vision tower's
        given = config.target_modules
        config.target_modules = lora_targets(model, given if isinstance(given, str) else sorted(given))
    # PEFT adapts parameters (the fused experts of a mixture-of-experts model) without dropout, and refuses any: the
    # adapter is made without, and the LoRA layers that can take it get it afterwards. The saved adapter_config.json
    # says 0, which is what lets PEFT load the adapter again.
    split_dropout = config.lora_dropout > 0 and bool(peft_targets(model, config).target_parameters)
    if split_dropout:
        config.lora_dropout = 0.0
        log.info(
            "lora_dropout: off for the mixture-of-experts parameters (PEFT cannot drop out there), %g on the other "
            "LoRA layers",
            params.lora_dropout,
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*")
        ignore_pattern_warnings()
        model = get_peft_model(model, config)
    if split_dropout:
        _dropout_on_layers(model, params.lora_dropout)
    # The model's own name: a GGUF-built model would record the folder of the .gguf file instead.
    model.peft_config["default"].base_model_name_or_path = params.model
    if trained_tokens:
        # The rows trained are saved as rows: PEFT would save the whole resized embedding matrices too once it
        # saw the base's vocabulary differ (load_adapter grows the base's embeddings before loading instead).
        model.save_pretrained = functools.partial(model.save_pretrained, save_embedding_layers=False)
    if params.init_lora_weights in CHANGES_BASE:
        keep_starting_adapter(model)
    return model


def keep_starting_adapter(model: Any) -> None:
    """Save the adapter as PiSSA/OLoRA made it, before any training: the trained one is saved converted against it
    (save_adapter), to a plain LoRA of the original base. The folder is rebuilt the same on a resume (the
    decompositions are deterministic)."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="tunelab-lora-start-")) / "start"
    with quiet_peft_save():
        model.save_pretrained(str(folder))
    model.tunelab_starting_adapter = folder
    log.info(
        "init_lora_weights=%s: the base weights now hold the residual; the adapter is saved converted to plain LoRA "
        "of the original base (rank %d)",
        model.peft_config["default"].init_lora_weights,
        2 * model.peft_config["default"].r,
    )


def save_converted_adapter(model: Any, folder: Path) -> None:
    """A PiSSA/OLoRA adapter saved as a plain LoRA of the original base (PEFT's conversion), over the one the Trainer
    wrote; nothing to do for the other inits."""
    start = getattr(model, "tunelab_starting_adapter", None)
    if start is None:
        return
    from safetensors.torch import load_file, save_file

    weights = folder / "adapter_model.safetensors"
    # PEFT's conversion keeps the LoRA matrices only: the modules trained whole (modules_to_save, a classifier's
    # score head) are taken over from the adapter the Trainer wrote.
    whole = {k: v for k, v in load_file(weights).items() if "lora_" not in k} if weights.is_file() else {}
    with quiet_peft_save():
        model.save_pretrained(str(folder), path_initial_model_for_weight_conversion=str(start))
    if whole:
        converted = load_file(weights)
        save_file({**converted, **{k: v for k, v in whole.items() if k not in converted}}, weights, {"format": "pt"})


def load_adapter(base: Any, folder: str | Path) -> Any:
    """The LoRA adapter saved in a run folder, on its base model (PeftModel), for generating, scoring or merging;
    the base first given the embedding rows of the tokens the run added (vocabulary.py)."""
    from peft import PeftModel

    from tunelab.models.vocabulary import adapter_rows, fit_embeddings

    rows = adapter_rows(Path(folder), base)
    if rows is not None:
        fit_embeddings(base, rows)
    with warnings.catch_warnings():
        ignore_pattern_warnings()
        return PeftModel.from_pretrained(base, str(folder))


def merge_into_base(model: Any) -> Any:
    """PEFT's merge_and_unload, with a tied input embedding and output head untied first where an adapter
    changes one of them (LoRA on lm_head or embed_tokens): merged into the one shared weight, the update would
    change the other as well, which the trained model never did. The merged model then has its own head weight
    (tie_word_embeddings false), as it does after modules_to_save trained the head."""
    from torch import nn

    base = model.get_base_model()
    head, embedding = base.get_output_embeddings(), base.get_input_embeddings()
    if head is not None and embedding is not None and (_lora_layer(head) or _lora_layer(embedding)):
        head_module = getattr(head, "base_layer", head)
        if head_module.weight is getattr(embedding, "base_layer", embedding).weight:
            head_module.weight = nn.Parameter(head_module.weight.detach().clone(), requires_grad=False)
            for config in {id(c): c for c in (base.config, base.config.get_text_config())}.values():
                config.tie_word_embeddings = False
            log.info("the adapter changes the tied embedding/output head: the merged model keeps them apart")
    return model.merge_and_unload()


def _lora_layer(module: Any) -> bool:
    return hasattr(module, "lora_A") or hasattr(module, "lora_embedding_A")


def ignore_pattern_warnings() -> None:
    # PEFT's own renaming for fused experts adds rank/alpha patterns for the parameters it adapts, then checks the
    # patterns against the adapted modules only, and warns that patterns it did apply were ignored.
    warnings.filterwarnings("ignore", message="The following (rank|alpha)_pattern keys did not match")


def peft_targets(model: Any, config: Any) -> Any:
    """A copy of the LoraConfig `config` as PEFT applies it to `model`: PEFT first renames the targets of models whose
    layers changed in transformers v5. Mixture-of-experts models fused their experts' gate_proj, up_proj and down_proj
    into the parameters gate_up_proj and down_proj, which PEFT then adapts as parameters (`target_parameters`)."""
    config = copy.deepcopy(config)
    try:
        from peft.utils.transformers_weight_conversion import (
            convert_peft_config_for_transformers,
            get_model_conversion_mapping,
        )
    except ImportError:  # a PEFT that does not rename: the config applies as it is
        return config
    convert_peft_config_for_transformers(config, model=model, conversions=get_model_conversion_mapping(model))
    return config


def _dropout_on_layers(model: Any, p: float) -> None:
    """Dropout `p` on every LoRA layer that can take it (all but PEFT's ParamWrapper), as PEFT itself would set it."""
    from peft.tuners.lora import LoraLayer, ParamWrapper
    from torch import nn

    for module in model.modules():
        if isinstance(module, LoraLayer) and not isinstance(module, ParamWrapper):
            for adapter in module.lora_dropout:
                module.lora_dropout[adapter] = nn.Dropout(p=p)


@contextlib.contextmanager
def quiet_peft_save() -> Iterator[None]:
    """Saving an adapter (a checkpoint or the final one), PEFT looks up the base model's config.json, locally or
    on the hub, to see whether the vocabulary changed; a GGUF base has none and an offline machine cannot fetch it,
    and PEFT warns at every save. The lookup has nothing to tell: a run that adds tokens saves their rows itself
    (add_lora), and load_adapter grows the base's embeddings before loading."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Could not find a config file")
        warnings.filterwarnings("ignore", message="Unable to fetch remote file")
        yield
