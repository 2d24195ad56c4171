"""Exporting a model folder to one GGUF file: the format llama.cpp, Ollama and LM Studio load.

`tunelab export --format gguf` calls `export_run`: a run folder holding a LoRA adapter is merged into its base
first (its `merged/` copy when the run kept one, else a temporary merge, inference/merge.py), then `export_gguf`
writes the plain transformers model folder. The file written mirrors what llama.cpp's own converter,
`convert_hf_to_gguf.py`, writes for the same model: the same metadata keys, tensor names, Q/K row order, tensor
types and tokenizer, so llama.cpp-compatible readers (and transformers' `gguf_file=` loader) take it as theirs.
https://github.com/ggml-org/llama.cpp/blob/master/convert_hf_to_gguf.py (classes TextModel, LlamaModel, Qwen2Model,
Qwen3Model)

The file is written beside its final name and renamed into place at the end, so an export that fails or is
interrupted never leaves a half-written .gguf under the name asked for.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.outputs import check_run_folder

log = logging.getLogger("tunelab")

# Types this module writes itself, and the K-quants (and q4_0) that llama.cpp's own quantizer makes from an f16
# file: what Ollama and LM Studio users deploy (q4_k_m is Ollama's default). llama.cpp keeps some tensors at a
# higher type where its rules say so (rows not a multiple of 256, the output head), as `llama-quantize` does.
WRITTEN = ("f32", "f16", "bf16", "q8_0")
BY_LLAMA_CPP = {
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
}
DTYPES = (*WRITTEN, *BY_LLAMA_CPP)


@dataclass(frozen=True)
class _Arch:
    """How one transformers architecture is written for llama.cpp."""

    gguf_name: str  # llama.cpp's architecture name: the metadata key prefix and the tensor-name table
    # llama.cpp's "llama" graph applies RoPE to adjacent pairs of each head (Meta's original layout), while
    # transformers' Llama rotates the two halves of each head, so llama.cpp's converter reorders the rows of
    # the Q and K projections (LlamaModel.permute); transformers undoes it on load (LlamaTensorProcessor).
    # Qwen2 runs with the rotate-half ("neox") RoPE in llama.cpp too, so its rows stay as they are.
    permute_qk: bool


# transformers class -> how llama.cpp takes it; convert_hf_to_gguf.py registers MistralForCausalLM as LlamaModel.
ARCHITECTURES = {
    "LlamaForCausalLM": _Arch("llama", permute_qk=True),
    "MistralForCausalLM": _Arch("llama", permute_qk=True),
    "Qwen2ForCausalLM": _Arch("qwen2", permute_qk=False),
    # Qwen3 is Qwen2 with a per-head RMSNorm on q and k (attn_q_norm / attn_k_norm) and no q/k/v biases; its
    # head_dim is its own (key_length / value_length), as convert_hf_to_gguf.py's Qwen3Model writes.
    "Qwen3ForCausalLM": _Arch("qwen3", permute_qk=False),
}


def export_run(model: str | Path, output: str | Path, dtype: str = "f16") -> Path:
    """Export a run folder or model folder to one GGUF file; a LoRA adapter is merged into its base first.

    Returns the path of the written file; raises TunelabError as `export_gguf` does, before anything is written.
    """
    from tunelab.inference.merge import merge_run

    folder = check_run_folder(model, "export")
    if not (folder / "adapter_config.json").is_file():
        return export_gguf(folder, output, dtype)
    if (folder / "merged" / "config.json").is_file():
        return export_gguf(folder / "merged", output, dtype)
    _check_dtype(dtype)  # a bad dtype is known before minutes of merging
    with tempfile.TemporaryDirectory(prefix="tunelab-merge-") as tmp:
        log.info("export: merging the LoRA adapter into its base first")
        merged = merge_run(folder, Path(tmp) / "merged")
        try:
            return export_gguf(merged, output, dtype)
        except TunelabError as err:  # name the user's run, not the temporary merge
            raise TunelabError(str(err).replace(str(merged), f"{folder} (merged with its base)")) from None


def export_gguf(model_dir: str | Path, output: str | Path, dtype: str = "f16") -> Path:
    """Write the model in `model_dir` to one GGUF file at `output`, its weights in `dtype`.

    Args:
        model_dir: a transformers model folder (config.json, safetensors weights, tokenizer files), or a tunelab
            run folder holding full weights or a `merged/` folder.
        output: the .gguf file to write (replaced if it exists; its folder is created).
        dtype: "f32", "f16" (the default), "bf16" or "q8_0" (8-bit blocks, about half the size of f16).
            Norms and other 1-D tensors stay f32 in every case, as llama.cpp expects.

    Returns:
        The path of the written file.

    Raises:
        TunelabError: an unknown dtype, a missing or unusable folder, an adapter without merged weights, or an
            architecture or tokenizer llama.cpp's format cannot take from this exporter.
    """
    # Everything that can be wrong with the input is checked before the output path is touched.
    qtype_name = _check_dtype(dtype)
    folder = _find_model_folder(model_dir)
    config = _read_config(folder)
    arch = _check_architecture(config, folder)
    target = Path(os.path.expanduser(str(output))).absolute()
    if target.is_dir():
        raise TunelabError(f"export: --output {target} is a folder; give the path of the .gguf file to write")

    import gguf

    writer = gguf.GGUFWriter(None, arch.gguf_name)
    vocab_size = _add_tokenizer(writer, folder, config)
    _add_hyperparameters(writer, config, folder, vocab_size, qtype_name)
    _add_tensors(writer, folder, config, arch, qtype_name)

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    unquantized = target.with_name(f".{target.name}.f16.partial")
    try:
        writer.write_header_to_file(unquantized if dtype in BY_LLAMA_CPP else partial)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if dtype in BY_LLAMA_CPP:
            _quantize_with_llama_cpp(unquantized, partial, dtype)
        os.replace(partial, target)
    except BaseException:  # interrupted too: no partial file left behind
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    finally:
        unquantized.unlink(missing_ok=True)
    log.info("export: wrote %s (%s, %.1f MB)", target, dtype, target.stat().st_size / 1e6)
    return target


def _check_dtype(dtype: str) -> str:
    """The GGMLQuantizationType name the file is written in (F16 for the types llama.cpp then quantizes); q8_0 only
    where the gguf package can write it, the K-quants only where llama-cpp-python is installed."""
    if dtype not in DTYPES:
        raise TunelabError(f"export: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if dtype in BY_LLAMA_CPP:
        import importlib.util

        if importlib.util.find_spec("llama_cpp") is None:
            raise TunelabError(
                f"export: --dtype {dtype} is made by llama.cpp's quantizer: pip install llama-cpp-python (it builds "
                "llama.cpp, a few minutes), or export f16 / q8_0, which need nothing more"
            )
        return "F16"
    if dtype in ("bf16", "q8_0"):
        from gguf import quants

        # gguf packages before 0.10 can read these types but have no numpy writer for them.
        if not hasattr(quants, dtype.upper()):
            raise TunelabError(f"export: this gguf package cannot write {dtype}; upgrade it (pip install -U gguf)")
    return dtype.upper()


def _quantize_with_llama_cpp(source: Path, target: Path, dtype: str) -> None:
    """llama.cpp's quantizer (what `llama-quantize` runs) from the f16 file to `dtype`, with its default rules."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, BY_LLAMA_CPP[dtype])
    params.nthread = os.cpu_count() or 1
    log.info("export: quantizing to %s with llama.cpp", dtype)
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
        raise TunelabError(f"export: llama.cpp could not quantize the model to {dtype} (its messages are above)")


def _find_model_folder(path: str | Path) -> Path:
    """The folder holding full weights: `path` itself or its `merged/` folder; else one clear TunelabError."""
    folder = Path(os.path.expanduser(str(path)))
    if not folder.exists():
        raise TunelabError(f"export: {folder} does not exist (give a model folder or a tunelab run folder)")
    if not folder.is_dir():
        hint = " (it is a GGUF file already)" if folder.suffix.lower() == ".gguf" else ""
        raise TunelabError(f"export: {folder} is not a folder{hint}; give a model folder or a tunelab run folder")
    if not (folder / "config.json").is_file() and (folder / "merged" / "config.json").is_file():
        folder = folder / "merged"  # a run trained with peft and merge_adapter
    if not (folder / "config.json").is_file():
        if (folder / "adapter_config.json").is_file():
            raise TunelabError(
                f"export: {folder} holds a LoRA adapter, not full weights: merge it first: "
                f"tunelab merge --model {folder} --output {folder}-merged (or `tunelab export`, which merges for you)"
            )
        raise TunelabError(f"export: {folder} has no config.json (not a transformers model folder)")
    if not _weight_files(folder):
        raise TunelabError(f"export: {folder} has no .safetensors weights (save the model with save_pretrained)")
    return folder


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _read_config(folder: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder)
    except (ValueError, OSError, json.JSONDecodeError) as error:
        raise TunelabError(f"export: {folder / 'config.json'} cannot be read: {error}") from error


def _check_architecture(config: Any, folder: Path) -> _Arch:
    problem = export_problem(config)
    if problem:
        raise TunelabError(f"export: {folder} {problem}")
    return next(ARCHITECTURES[name] for name in _architectures(config) if name in ARCHITECTURES)


def export_problem(config: Any) -> str | None:
    """Why a model of this config cannot be exported to GGUF (a phrase after the model's name), or None when it
    can. The dry run asks it too, so a run learns before training that its result will not export."""
    names = _architectures(config)
    if not any(name in ARCHITECTURES for name in names):
        found = ", ".join(names) or f"model_type {config.model_type!r}"
        return f"is a {found}; GGUF export supports {', '.join(ARCHITECTURES)}"
    arch = next(ARCHITECTURES[name] for name in names if name in ARCHITECTURES)
    rope_type = _rope(config)[1]
    if rope_type not in (None, "default", *ROPE_SCALINGS[arch.gguf_name]):
        return f"uses RoPE scaling {rope_type!r}, which GGUF export does not write for {arch.gguf_name} models"
    if getattr(config, "mlp_bias", False) or (arch.gguf_name == "llama" and getattr(config, "attention_bias", False)):
        return "has bias terms llama.cpp's Llama graph does not take"
    return None


def _architectures(config: Any) -> list[str]:
    """The model classes a config names; a config built in code names none, so its causal-LM class stands in."""
    names = list(getattr(config, "architectures", None) or [])
    if not names:
        from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

        model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config))
        names = [model_class.__name__] if model_class is not None else []
    return names


# The RoPE scalings written for each llama.cpp architecture. linear and yarn are metadata keys llama.cpp reads for
# any architecture; llama3's per-frequency factors are a `rope_freqs` tensor, which llama.cpp's llama graph reads.
ROPE_SCALINGS = {"llama": ("llama3", "linear", "yarn"), "qwen2": ("linear", "yarn"), "qwen3": ("linear", "yarn")}


def _rope_parameters(config: Any) -> dict[str, Any]:
    """transformers 5 keeps RoPE's settings in rope_parameters, 4.x in rope_scaling and on the config itself."""
    return dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})


def _rope(config: Any) -> tuple[float, str | None]:
    """(rope_theta, rope_type)."""
    params = _rope_parameters(config)
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return float(theta), params.get("rope_type", params.get("type"))


def _add_rope_scaling(writer: Any, config: Any) -> None:
    """The scaling keys of TextModel.set_gguf_parameters (linear, yarn); llama3 is a tensor (_llama3_rope_factors)."""
    import gguf

    params, kind = _rope_parameters(config), _rope(config)[1]
    if kind in ("linear", "yarn"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if kind == "linear" else gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(params["factor"]))
    if kind == "yarn" and params.get("original_max_position_embeddings"):
        writer.add_rope_scaling_orig_ctx_len(int(params["original_max_position_embeddings"]))


def _llama3_rope_factors(config: Any, head_dim: int) -> Any:
    """Llama 3.1's frequency-dependent scaling as one factor per rotary frequency (what llama.cpp divides each
    frequency by): high frequencies (short wavelengths) kept, low ones divided by `factor`, a smooth blend between."""
    import math

    import numpy as np

    params = _rope_parameters(config)
    theta = _rope(config)[0]
    factor, low, high = float(params["factor"]), float(params["low_freq_factor"]), float(params["high_freq_factor"])
    context = float(params["original_max_position_embeddings"])
    frequencies = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factors = []
    for frequency in frequencies:
        wavelength = 2 * math.pi / frequency
        if wavelength < context / high:
            factors.append(1.0)
        elif wavelength > context / low:
            factors.append(factor)
        else:
            smooth = (context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _add_hyperparameters(writer: Any, config: Any, folder: Path, vocab_size: int, qtype_name: str) -> None:
    """The metadata TextModel.set_gguf_parameters and LlamaModel.set_gguf_parameters write."""
    import gguf

    name = folder.parent.name if folder.name == "merged" else folder.name
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope(config)[0])
    _add_rope_scaling(writer, config)
    writer.add_vocab_size(vocab_size)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    file_type = {
        "F32": gguf.LlamaFileType.ALL_F32,
        "F16": gguf.LlamaFileType.MOSTLY_F16,
        "BF16": gguf.LlamaFileType.MOSTLY_BF16,
        "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[qtype_name]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tensors(writer: Any, folder: Path, config: Any, arch: _Arch, qtype_name: str) -> None:
    """Every weight under llama.cpp's name, Q/K rows reordered where needed, in the requested type."""
    import gguf
    from safetensors import safe_open

    name_map = gguf.get_tensor_name_map(_gguf_arch(arch.gguf_name), config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    n_head = config.num_attention_heads
    n_head_kv = config.num_key_value_heads or n_head
    written = set()
    for path in _weight_files(folder):
        with safe_open(str(path), framework="pt") as weights:
            for hf_name in weights.keys():  # noqa: SIM118 - safe_open is not a dict
                if hf_name.endswith("rotary_emb.inv_freq"):
                    continue  # recomputed by every runtime; old checkpoints carry it (convert skips it too)
                if tied and hf_name == "lm_head.weight":
                    continue  # llama.cpp reuses token_embd as the output when output.weight is absent
                gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise TunelabError(f"export: {path.name}: no llama.cpp name for tensor {hf_name!r}")
                data = weights.get_tensor(hf_name).float().numpy()
                if arch.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                    data = _permute(data, n_head, n_head)
                elif arch.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                    data = _permute(data, n_head, n_head_kv)
                data, qtype = _quantize(data, gguf_name, qtype_name)
                writer.add_tensor(gguf_name, data, raw_dtype=qtype)
                written.add(gguf_name)
    if not tied and "output.weight" not in written:
        raise TunelabError(f"export: {folder} has no lm_head.weight and does not tie it to the embeddings")
    if _rope(config)[1] == "llama3":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
        writer.add_tensor(
            "rope_freqs.weight", _llama3_rope_factors(config, head_dim), raw_dtype=gguf.GGMLQuantizationType.F32
        )


def _gguf_arch(name: str) -> Any:
    import gguf

    return next(arch for arch, arch_name in gguf.MODEL_ARCH_NAMES.items() if arch_name == name)


def _permute(weights: Any, n_head: int, n_head_kv: int) -> Any:
    """LlamaModel.permute in convert_hf_to_gguf.py: each head's rotate-half rows to interleaved pairs."""
    if n_head_kv != n_head:
        n_head = n_head_kv
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _quantize(data: Any, gguf_name: str, qtype_name: str) -> tuple[Any, Any]:
    """The tensor in the file's type; the choices follow ModelBase.prepare_tensors in convert_hf_to_gguf.py."""
    import numpy as np
    from gguf import GGMLQuantizationType, QuantError, quants

    qtype = GGMLQuantizationType[qtype_name]
    # llama.cpp's kernels for norms and other 1-D tensors take f32 only.
    if data.ndim <= 1 or gguf_name.endswith("_norm.weight"):
        qtype = GGMLQuantizationType.F32
    try:
        return quants.quantize(data.astype(np.float32, copy=False), qtype), qtype
    except QuantError as error:  # a row length that is not a whole number of Q8_0 blocks (32 values)
        log.warning("export: %s: %s; writing it as f16", gguf_name, error)
        return quants.quantize(data, GGMLQuantizationType.F16), GGMLQuantizationType.F16


# What the backend tokenizer's pre-tokenizer looks like -> llama.cpp's name for it (tokenizer.ggml.pre), which
# tells llama.cpp how to split text before the merges. convert_hf_to_gguf.py recognises tokenizers by hashing
# their output on a test text; a tokenizer trained by the user matches no hash, so the shape is read instead.
_QWEN2_REGEX_START = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?"
_LLAMA3_REGEX_START = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?"


def _pre_tokenizer_name(backend: dict) -> str:
    pre = backend.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # GPT-2's split, which SmolLM's and tunelab's test tokenizers use
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"  # GPT-2's split after cutting numbers into single digits
    if kinds == ["Split", "ByteLevel"]:
        regex = steps[0].get("pattern", {}).get("Regex", "")
        if regex.startswith(_QWEN2_REGEX_START):
            return "qwen2"
        if regex.startswith(_LLAMA3_REGEX_START):
            return "llama-bpe"
    log.warning("export: unrecognised pre-tokenizer %s; llama.cpp will split text its default way", kinds)
    return "default"


def _add_tokenizer(writer: Any, folder: Path, config: Any) -> int:
    """A byte-level BPE tokenizer as TextModel._set_vocab_gpt2 writes it; returns the vocabulary size written."""
    import gguf
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    # tokenizer.json exactly as saved: AutoTokenizer may pick a model-specific class that adds default special
    # tokens or swaps the pre-tokenizer (transformers 5 does both for Qwen2Tokenizer).
    loader = PreTrainedTokenizerFast if (folder / "tokenizer.json").is_file() else AutoTokenizer
    try:
        tokenizer = loader.from_pretrained(folder)
    except (ValueError, OSError) as error:
        raise TunelabError(f"export: {folder} has no usable tokenizer: {error}") from error
    backend = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    byte_level = "ByteLevel" in json.dumps(backend.get("pre_tokenizer")) + json.dumps(backend.get("decoder"))
    if backend.get("model", {}).get("type") != "BPE" or not byte_level:
        raise TunelabError(
            f"export: {folder}: only byte-level BPE tokenizers (GPT-2 style, as SmolLM2, Llama 3 and Qwen2 use) "
            "can be exported to GGUF here"
        )

    vocab = tokenizer.get_vocab()
    vocab_size = config.vocab_size  # one token per embedding row: llama.cpp checks the two agree
    if max(vocab.values()) >= vocab_size:
        raise TunelabError(
            f"export: {folder}: the tokenizer has ids up to {max(vocab.values())}, beyond the model's "
            f"vocab_size {vocab_size} (resize the embeddings when adding tokens)"
        )
    by_id = {index: token for token, index in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:  # the embedding matrix is often padded past the tokenizer
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:  # llama.cpp matches added tokens whole; CONTROL ones are specials
            tokens.append(added[index].content)
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(backend))
    writer.add_token_list(tokens)
    writer.add_token_types(types)

    # llama.cpp's own reader of tokenizer.json / tokenizer_config.json / config.json: merges, special token ids
    # and the chat template, exactly as its converter takes them.
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    if special.chat_template is None and tokenizer.chat_template:
        special.chat_template = tokenizer.chat_template
    # Whether BOS/EOS are added is measured on the tokenizer itself, not guessed from its post-processor.
    with_specials = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    extra = len(with_specials) > len(plain)
    special.add_special_token["bos"] = extra and with_specials[0] == tokenizer.bos_token_id
    special.add_special_token["eos"] = extra and with_specials[-1] == tokenizer.eos_token_id
    special.add_to_gguf(writer, quiet=True)
    return vocab_size
