"""What can be known about the base model before its weights load: checked from its config, in the prepare step
of every task (tasks/llm.py, tasks/text_classification.py), so a mismatch is one clear line, not a traceback
after minutes of loading.

In order: the config reads (valid JSON, a model type transformers knows); transformers has a class for the task; a
local folder's weights are whole (their safetensors headers); the rows fit the model's positions; the LoRA targets
exist. A run that stretches the model's rotary positions (rope_scaling) is checked against the stretched
config. The targets are looked up in a skeleton of the model built on the meta device (no memory, no weights), and
only when named: the default, all-linear, always finds the linear layers, and the dry run stays fast. A .gguf file
is checked when it is resolved (models/load.py).
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Any

from tunelab.config.base import RunParams, listed_tokens
from tunelab.errors import ConfigError, TunelabError
from tunelab.models.freeze import Choice, check_sharding, is_freezing, trainable_names
from tunelab.models.load import ModelSource, load_config
from tunelab.models.peft import lora_config, peft_targets, target_modules
from tunelab.models.positions import rope_scaling_of, stretch_config
from tunelab.models.vision import is_vision_language, language_model_class

log = logging.getLogger("tunelab")

# What each kind of run builds: the transformers auto class, its mapping of config classes, and why it is needed.
_CAUSAL = ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING")
_SEQ_CLS = ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING")
TASK_CLASSES = {
    "causal_lm": (*_CAUSAL, "tunelab llm trains a causal LM"),
    "reward": (*_SEQ_CLS, "a reward model is a sequence classifier"),
    "classifier": (*_SEQ_CLS, "text classification trains a sequence classifier"),
}


def check_model(source: ModelSource, params: RunParams, kind: str = "causal_lm", reference: bool = False) -> Any:
    """Raise TunelabError for a model or a setting this model cannot take (kind: "causal_lm", "reward" or
    "classifier"; `reference`: the frozen model_ref); log a warning for one it takes at a cost. Returns the
    model's config, its positions stretched as the run will stretch them (models/positions.py)."""
    config = read_config(source)
    check_task(source, config, kind)
    if not source.gguf_file and Path(source.path).is_dir():
        check_weights(Path(source.path))
    scaling = rope_scaling_of(config, params, source.name, required=not reference)
    if scaling:
        stretch_config(config, scaling)
    check_length(source, config, params)
    coefficient = getattr(params, "router_aux_loss_coef", None)  # (the trained model's: a reference never routes)
    if coefficient and not reference and not _balances_experts(config):
        raise ConfigError(
            f"router_aux_loss_coef: model {source.name} ({config.model_type}) has no load-balancing loss for "
            "experts (a dense model, or experts routed without one), so there is nothing to weigh: leave it out"
        )
    if params.quantization is not None and source.gguf_file:
        raise ConfigError(
            f"quantization={params.quantization}: model {source.name} is a GGUF file, which loads dequantized to "
            "float; int4/int8 loading needs a model folder (or drop quantization)"
        )
    if params.peft:
        check_targets(source, config, params, kind)
        check_lora_variants(source, config, params, kind)
    if is_freezing(params) and not reference:
        check_freezing(config, params, kind)
    return config


def check_freezing(config: Any, params: RunParams, kind: str) -> None:
    """A freeze run's settings name parameters of this model (models/freeze.py), and train the rows of the tokens
    the run adds."""
    check_sharding(params)
    choice = freeze_choice(config, params, kind)
    tied = getattr(config.get_text_config(), "tie_word_embeddings", False)  # (training embed_tokens trains both)
    head_frozen = kind == "causal_lm" and not choice.head and not tied
    if listed_tokens(params) and (not choice.embeddings or head_frozen):
        missing = [
            name for name, frozen in (("embed_tokens", not choice.embeddings), ("lm_head", head_frozen)) if frozen
        ]
        what = {"embed_tokens": "the input embeddings", "lm_head": "the output head"}
        raise ConfigError(
            f"add_tokens with freeze training: the added tokens' rows would stay as they start unless "
            f"{' and '.join(what[name] for name in missing)} train: add {','.join(missing)} to freeze_extra_modules"
        )


def _balances_experts(config: Any) -> bool:
    """Whether the causal LM class of the config has a load-balancing loss for its experts that tunelab can add
    (models.balancing_loss: Mixtral, Qwen-MoE, OLMoE, gpt-oss...; DeepSeek-V3 and Llama 4 route without one)."""
    from transformers import AutoModelForCausalLM

    from tunelab.models.experts import balancing_loss

    try:
        model_class = AutoModelForCausalLM._model_mapping[type(config)]
    except (KeyError, ValueError):
        return False
    return balancing_loss(model_class) is not None


# Quantized checkpoints whose LoRA layers PEFT has without DoRA (peft/tuners/lora/{gptq,awq,aqlm,eetq}.py refuse it).
NO_DORA = ("gptq", "awq", "aqlm", "eetq")


def check_lora_variants(source: ModelSource, config: Any, params: RunParams, kind: str) -> None:
    """The LoRA variants this model and machine can take, as PEFT would find once the weights are loaded."""
    quantized = getattr(config, "quantization_config", None)
    method = quantized.get("quant_method") if isinstance(quantized, dict) else getattr(quantized, "quant_method", None)
    method = str(method).lower() if method else None
    if params.use_dora and method in NO_DORA:
        raise ConfigError(
            f"use_dora: model {source.name} is {method}-quantized, and PEFT has no DoRA for {method} layers: set "
            "use_dora false (plain LoRA trains on it), or use a float model"
        )
    if params.use_dora or params.init_lora_weights in ("pissa", "olora"):
        check_parameter_targets(source, config, params, kind)
    if params.use_dora and params.quantization is not None and method is None:
        log.info(
            "use_dora on a %s base: DoRA dequantizes each weight to compute its norm (slower)", params.quantization
        )
    if params.init_lora_weights in ("pissa", "olora") and (params.quantization or method):
        raise ConfigError(
            f"init_lora_weights={params.init_lora_weights} moves part of each base weight into the adapter, which a "
            "quantized base cannot take: use a float base, or the default init"
        )
    wanted = [name.strip() for name in (params.modules_to_save or "").split(",") if name.strip()]
    if wanted:
        model = skeleton(config, kind)
        names = [key for key, _ in model.named_modules() if key]
        missing = [t for t in wanted if not any(_named(t, key) for key in names)]
        if missing:
            tops = list(dict.fromkeys(key.rsplit(".", 1)[-1] for key in names if key.count(".") <= 1))
            raise ConfigError(
                f"modules_to_save: model {source.name} has no module named {' or '.join(missing)}; its outer modules "
                f"are {', '.join(tops)}"
            )


def fit_tokenizer(tokenizer: Any, config: Any, source: ModelSource) -> None:
    """The tokenizer's special tokens must be rows of the model's embeddings. A tokenizer class can add a pad token
    of its own beyond them (transformers' Qwen2 tokenizer adds <|endoftext|> when the vocabulary has none), which
    padded batches (pairs, classification) would look up out of range: pad with EOS instead."""
    vocab = getattr(config.get_text_config(), "vocab_size", None)  # (a vision-language model's: its text config's)
    if not isinstance(vocab, int):
        return
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id >= vocab and tokenizer.eos_token_id is not None:
        log.info("tokenizer: its pad token %r is not in the model's vocabulary; padding with EOS", tokenizer.pad_token)
        tokenizer.pad_token = tokenizer.eos_token
    for role in ("bos", "eos", "pad"):
        token_id = getattr(tokenizer, f"{role}_token_id")
        if token_id is not None and token_id >= vocab:
            raise TunelabError(
                f"model {source.name}: the tokenizer's {role} token (id {token_id}) is beyond the model's vocabulary "
                f"(vocab_size {vocab}): use the model's own tokenizer, or resize its embeddings"
            )


def check_token_ids(highest: int, config: Any, source: ModelSource) -> None:
    """The largest token id of the tokenized data is a row of the model's embeddings (else an IndexError
    mid-training)."""
    vocab = getattr(config.get_text_config(), "vocab_size", None)
    if isinstance(vocab, int) and highest >= vocab:
        raise TunelabError(
            f"model {source.name}: the tokenized data holds token id {highest}, beyond the model's vocabulary "
            f"(vocab_size {vocab}): the tokenizer has more tokens than the model's embeddings; use the model's own "
            "tokenizer, or resize its embeddings"
        )


def read_config(source: ModelSource) -> Any:
    """The model's transformers config, or one line saying why it cannot be read."""
    file = Path(source.path) / "config.json"
    if not source.gguf_file and file.is_file():
        _check_config_file(source, file)
    try:
        return load_config(source)
    except (OSError, ValueError, KeyError) as err:  # an unreadable GGUF architecture, a hub error, ...
        first_line = (str(err).strip() or type(err).__name__).splitlines()[0]
        raise TunelabError(f"model {source.name}: transformers cannot read its config ({first_line})") from None


def _check_config_file(source: ModelSource, file: Path) -> None:
    """config.json is a JSON object naming a model type this transformers knows (its own errors are tracebacks)."""
    from transformers import CONFIG_MAPPING, __version__

    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as err:
        raise TunelabError(f"model {source.name}: config.json is not valid JSON ({err}): fix or download it") from None
    if not isinstance(raw, dict) or not raw.get("model_type"):
        raise TunelabError(f"model {source.name}: {file} names no model_type (not a transformers model config)")
    if raw["model_type"] not in CONFIG_MAPPING:
        custom = " and needs its own modeling code (auto_map), which tunelab does not run" if "auto_map" in raw else ""
        raise TunelabError(
            f"model {source.name}: config.json has model_type {raw['model_type']!r}, which transformers {__version__} "
            f"does not know{custom}; use a model of a known type (or a newer transformers)"
        )


def check_task(source: ModelSource, config: Any, kind: str) -> None:
    """transformers has a class that builds this kind of model from this config: a T5 has no causal-LM class, and
    many decoder families (Granite, Cohere, Mamba) no sequence-classification one."""
    import transformers

    auto_class, mapping, why = TASK_CLASSES[kind]
    if kind == "causal_lm" and is_vision_language(config):
        return  # built as image-text-to-text (models/vision.py)
    if type(config) not in getattr(transformers, mapping):
        raise TunelabError(
            f"model {source.name}: transformers has no {auto_class} class for model type {config.model_type!r} "
            f"({why}); pick a model of another family"
        )


def check_weights(folder: Path) -> None:
    """The weights of a local model folder are there and whole, from their safetensors headers alone: a cut-short
    download otherwise fails only when the weights load, after the data has been read."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise TunelabError(f"model folder {folder}: {index.name} is damaged: download it again") from None
    elif (folder / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    elif list(folder.glob("pytorch_model*.bin")):
        return  # the old pickle format: nothing cheap to check
    else:
        raise TunelabError(f"model folder {folder} has no weights (no model.safetensors): download it again")
    for shard in shards:
        problem = safetensors_problem(folder / shard)
        if problem:
            raise TunelabError(f"model folder {folder}: {shard} {problem}: download it again")


def safetensors_problem(file: Path) -> str | None:
    """What is wrong with a safetensors file (missing, cut short, a damaged header), or None. The format: 8 bytes of
    header length, a JSON header giving each tensor's byte range, then the data those ranges cover."""
    if not file.is_file():
        return "is missing"
    size = file.stat().st_size
    with file.open("rb") as data:
        head = data.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else size
        if length > size - 8:
            return f"is truncated or not a safetensors file ({size:,} bytes, too few for its header)"
        try:
            header = json.loads(data.read(length))
            end = max((t["data_offsets"][1] for key, t in header.items() if key != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return "is damaged (its header is not a safetensors header)"
    if 8 + length + end > size:
        return f"is truncated ({size:,} bytes; its header describes {8 + length + end:,})"
    return None


def check_length(source: ModelSource, config: Any, params: RunParams) -> None:
    """Rows longer than the model's positions. A RoPE model computes its positions, so longer rows run, if untested
    by its training: a warning. Other models (GPT-2, BERT, OPT) learned one embedding per position and fail at the
    first longer row: an error."""
    text = config.get_text_config()  # (a vision-language model's positions are its language model's)
    positions = getattr(text, "max_position_embeddings", None)
    name = "block_size" if hasattr(params, "block_size") else "max_seq_length"
    length = getattr(params, name)
    if not isinstance(positions, int) or length <= positions:
        return
    if getattr(text, "rope_parameters", None) or getattr(config, "rope_parameters", None):
        log.warning(
            "%s (%d) is longer than the %d positions of %s (max_position_embeddings): its rotary positions reach that "
            "far, but it was never trained on them; expect weaker results on rows past %d tokens%s",
            name,
            length,
            positions,
            source.name,
            positions,
            ", or stretch them to fit (rope_scaling: linear or yarn)" if hasattr(params, "rope_scaling") else "",
        )
        return
    raise ConfigError(
        f"{name} ({length}) is longer than the {positions} positions of model {source.name} "
        f"(max_position_embeddings, one learned embedding each): lower {name} to {positions} or less"
    )


def check_targets(source: ModelSource, config: Any, params: RunParams, kind: str) -> None:
    """Every name in target_modules matches a layer LoRA can adapt, the way PEFT matches them: a module whose name is
    the target or ends with "." + target; for the fused experts PEFT renames (peft.peft_targets), a parameter."""
    wanted = target_modules(params.target_modules)
    if wanted == "all-linear":
        return
    if not wanted:
        raise ConfigError(f"target_modules {params.target_modules!r} names no module: give names (q_proj,v_proj)")
    model = skeleton(config, kind)
    try:
        applied = peft_targets(model, lora_config(params, _task_type(kind)))
    except ValueError as err:  # PEFT's renaming: gate_proj without up_proj, which the experts hold fused
        raise ConfigError(f"target_modules: {err}") from None
    modules = [(key, module) for key, module in model.named_modules() if key]
    parameters = [key for key, _ in model.named_parameters()]
    as_modules = [t for t in wanted if t in applied.target_modules]
    missing = [t for t in as_modules if not any(_named(t, key) for key, _ in modules)]
    missing += [t for t in applied.target_parameters or () if not any(_named(t, key) for key in parameters)]
    if missing:
        hint = " (they are names, not patterns)" if any(set(t) & set("*^$[]|\\") for t in missing) else ""
        raise ConfigError(
            f"target_modules: model {source.name} ({config.model_type}) has no module named {' or '.join(missing)}"
            f"{hint}; its linear layers are {', '.join(linear_layer_names(model))} (or use all-linear)"
        )
    for key, module in modules:
        if any(_named(t, key) for t in as_modules) and not _fits(module):
            raise ConfigError(
                f"target_modules: {key} ({type(module).__name__}) is not a layer LoRA can adapt; name linear layers "
                f"({', '.join(linear_layer_names(model))}) or use all-linear"
            )


def check_parameter_targets(source: ModelSource, config: Any, params: RunParams, kind: str) -> None:
    """DoRA, PiSSA and OLoRA where PEFT adapts parameters, not layers (the fused experts of a mixture-of-experts
    model): PEFT has none of them there and failed once the weights were loaded."""
    try:
        applied = peft_targets(skeleton(config, kind), lora_config(params, _task_type(kind)))
    except ValueError:
        return  # check_targets said what is wrong with the names
    fused = sorted(set(applied.target_parameters or ()))
    if not fused:
        return
    setting = "use_dora" if params.use_dora else f"init_lora_weights={params.init_lora_weights}"
    undo = "set use_dora false" if params.use_dora else "use the default init"
    raise ConfigError(
        f"{setting}: model {source.name} ({config.model_type}) keeps its experts' weights fused in parameters "
        f"({', '.join(fused)}), which PEFT adapts as plain LoRA only: {undo}, or set target_modules to the "
        "attention layers (q_proj,k_proj,v_proj,o_proj) to keep it there"
    )


def _task_type(kind: str) -> str:
    return "CAUSAL_LM" if kind == "causal_lm" else "SEQ_CLS"


# What each freeze run trains, by its model's config and settings: the memory estimate asks once per checkpointing
# setting it tries (up to one per layer), and a skeleton of a large model takes a while to build.
_CHOICES: dict[tuple, Choice] = {}


def freeze_choice(config: Any, params: RunParams, kind: str) -> Choice | None:
    """What a freeze run trains (models/freeze.trainable_names on a skeleton of the model), None for another run."""
    if params.peft or not is_freezing(params):
        return None
    settings = (params.freeze_trainable_layers, params.freeze_trainable_modules, params.freeze_extra_modules)
    key = (config.to_json_string(use_diff=False), kind, *settings, tuple(params.unfrozen_parameters or ()))
    if key not in _CHOICES:
        if len(_CHOICES) >= 8:
            _CHOICES.clear()
        _CHOICES[key] = trainable_names(skeleton(config, kind), params)
    return _CHOICES[key]


def skeleton(config: Any, kind: str) -> Any:
    """The model the config describes, on the meta device: its modules and parameter names, no memory and no
    initialisation (about 20 ms for SmolLM2-135M once its modeling code is imported)."""
    import torch
    import transformers

    auto_class = getattr(transformers, TASK_CLASSES[kind][0])
    if kind == "causal_lm":
        auto_class = language_model_class(config)
    with torch.device("meta"):
        return auto_class.from_config(config)


# The attribute a transformers sequence classifier keeps its new head under: decoders `score`, encoders `classifier`.
CLASSIFIER_HEADS = ("score", "classifier")


def linear_layer_names(model: Any) -> list[str]:
    """The distinct last names of the model's linear layers, in model order, without the output or classification
    head: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj for a Llama."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    heads = [model.get_output_embeddings(), *(getattr(model, name, None) for name in CLASSIFIER_HEADS)]
    linear = [key for key, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and m not in heads]
    return list(dict.fromkeys(key.rsplit(".", 1)[-1] for key in linear))


def _named(target: str, key: str) -> bool:
    """PEFT's rule for a name in a target list: the full name, or its last dotted parts."""
    return key == target or key.endswith("." + target)


def _fits(module: Any) -> bool:
    """A layer type PEFT's LoRA can wrap (peft/tuners/lora/model.py dispatches these)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    layers = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, Conv1D)
    return isinstance(module, layers)


def check_teacher(params: RunParams, config: Any, tokenizer: Any) -> None:
    """distill: the teacher (`teacher_model`) is a causal LM this run can load, reads text as the same tokens and
    predicts over the same vocabulary as the model trained (one distribution compared with the other, token by
    token), checked before either loads."""
    import copy

    from tunelab.models.load import load_tokenizer, resolve_model

    source = resolve_model(params.teacher_model)
    frozen = copy.copy(params)  # checked as the frozen model it is: without LoRA, unquantized (as a model_ref is)
    frozen.peft, frozen.quantization = False, None
    teacher = check_model(source, frozen, "causal_lm", reference=True).get_text_config()
    if teacher.vocab_size < len(tokenizer):
        raise ConfigError(
            f"teacher_model {source.name} predicts over {teacher.vocab_size:,} tokens, fewer than the "
            f"{len(tokenizer):,} of model {params.model}'s tokenizer: distillation compares the two distributions "
            "token by token (a teacher of the same family)"
        )
    # The ids the model's tokenizer has, read the same: a padded vocabulary's spare rows, and the placeholders a
    # GGUF file names them by, are no tokens (speed/divergence.py compares the ids both heads have).
    mine = tokenizer.get_vocab()
    theirs = {token: i for token, i in load_tokenizer(source).get_vocab().items() if i < len(tokenizer)}
    if theirs != mine:
        differs = next((token for token in sorted(mine) if theirs.get(token) != mine[token]), None)
        differs = differs or next(token for token in sorted(theirs) if token not in mine)
        raise ConfigError(
            f"teacher_model {source.name} has another tokenizer than model {params.model} (token {differs!r}: id "
            f"{theirs.get(differs)} there, {mine.get(differs)} here): distillation needs the same tokens in both"
        )
