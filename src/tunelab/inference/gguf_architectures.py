"""How each transformers architecture is written for llama.cpp: its metadata and its tensors.

One `Architecture` per model class, in the shape llama.cpp's converter (`convert_hf_to_gguf.py` and its
`conversion/` classes) writes it and llama.cpp's loader (`src/models/<arch>.cpp`) reads it: the metadata keys,
tensor names, the Q/K row order, Gemma's `1 + w` norms, GPT-2's transposed Conv1D weights, MoE experts stacked
per layer. What llama.cpp's graph cannot reproduce (a RoPE scaling it does not take, an attention scale it
hard-codes differently, a layer pattern it fixes) is a `problem`, found before anything is written.
https://github.com/ggml-org/llama.cpp/tree/master/conversion
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.models.positions import rope_parameters

log = logging.getLogger("tunelab")


@dataclass(frozen=True)
class Architecture:
    """How one transformers architecture is written for llama.cpp."""

    gguf_name: str  # llama.cpp's architecture name: the metadata key prefix and the tensor-name table
    # llama.cpp's "normal" RoPE (llama, granite, smollm3) rotates adjacent pairs of each head (Meta's original
    # layout), while transformers rotates the two halves of each head, so the converter reorders the rows of the
    # Q and K projections (LlamaModel.permute). The "neox" RoPE (qwen, gemma, phi3, olmo2) is rotate-half already.
    permute_qk: bool = False
    norm_shift: float = 0.0  # Gemma's RMSNorm multiplies by (1 + w); llama.cpp by the weight written
    rope_scalings: tuple[str, ...] = ("linear", "yarn")
    extra_metadata: Callable[[Any, Any], None] | None = None  # (writer, config): the family's own keys
    problem: Callable[[Any], str | None] | None = None  # what llama.cpp's graph for it cannot reproduce
    ties_output: bool = False  # llama.cpp uses the embeddings as the output head whatever the file holds


# ---- family-specific metadata and refusals -------------------------------------------------------------------


def _layer_types(config: Any) -> list[str]:
    return list(getattr(config, "layer_types", None) or [])


def _gemma_attention_problem(config: Any, big_layers: int) -> str | None:
    # llama.cpp scales queries by 1/sqrt(head_dim), or by 1/sqrt(hidden/heads) for the 27B model it recognises
    # by its layer count; transformers by 1/sqrt(query_pre_attn_scalar).
    head_dim = config.head_dim
    expected = config.hidden_size // config.num_attention_heads if config.num_hidden_layers == big_layers else head_dim
    if getattr(config, "query_pre_attn_scalar", expected) != expected:
        return (
            f"scales attention by query_pre_attn_scalar {config.query_pre_attn_scalar}; llama.cpp scales it by "
            f"its head size {expected}"
        )
    return None


def _gemma2_problem(config: Any) -> str | None:
    if config.attn_logit_softcapping is None or config.final_logit_softcapping is None:
        return "has no logit soft-capping, which llama.cpp's gemma2 graph always applies"
    if not getattr(config, "tie_word_embeddings", True):
        return "has an output head of its own; llama.cpp's gemma2 graph uses the embeddings"
    return _gemma_attention_problem(config, big_layers=46)


def _gemma2_metadata(writer: Any, config: Any) -> None:
    writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    writer.add_final_logit_softcapping(config.final_logit_softcapping)
    _add_sliding_window(writer, config)


def _gemma3_problem(config: Any) -> str | None:
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "soft-caps attention logits, which llama.cpp's gemma3 graph does not"
    return _gemma_attention_problem(config, big_layers=62)


def _gemma3_metadata(writer: Any, config: Any) -> None:
    sliding = rope_parameters(config).get("sliding_attention", {})
    if "rope_theta" in sliding:  # local layers' own base (10k); the global one is rope_freq_base
        writer.add_rope_freq_base_swa(float(sliding["rope_theta"]))
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    _add_sliding_window(writer, config)


def _add_sliding_window(writer: Any, config: Any) -> None:
    """The window and which layers use it (layer_types), so llama.cpp follows the config, not its default."""
    kinds = _layer_types(config)
    if config.sliding_window and "sliding_attention" in kinds:
        writer.add_sliding_window(int(config.sliding_window))
        writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in kinds])


def _phi3_metadata(writer: Any, config: Any) -> None:
    params = rope_parameters(config)
    original = params.get("original_max_position_embeddings") or getattr(
        config, "original_max_position_embeddings", None
    )
    if original:
        writer.add_rope_scaling_orig_ctx_len(int(original))
    writer.add_sliding_window(int(config.sliding_window or 0))  # 0 tells llama.cpp the model has none


def _granite_metadata(writer: Any, config: Any) -> None:
    # transformers' names are *_multiplier; llama.cpp's keys are *_scale (GraniteModel.set_gguf_parameters).
    writer.add_attention_scale(float(config.attention_multiplier))
    writer.add_embedding_scale(float(config.embedding_multiplier))
    writer.add_residual_scale(float(config.residual_multiplier))
    writer.add_logit_scale(float(config.logits_scaling))


def _smollm3_problem(config: Any) -> str | None:
    # llama.cpp's smollm3 graph skips RoPE on every 4th layer, fixed; transformers reads no_rope_layers.
    fixed = [int((layer + 1) % 4 != 0) for layer in range(config.num_hidden_layers)]
    if list(getattr(config, "no_rope_layers", fixed)) != fixed:
        return "skips RoPE on other layers than every 4th, the pattern llama.cpp's smollm3 graph fixes"
    if getattr(config, "use_sliding_window", False):
        return "uses sliding-window attention, which llama.cpp's smollm3 graph does not"
    return None


def _moe_problem(config: Any) -> str | None:
    if getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) != 1:
        return "mixes dense and expert layers; llama.cpp's qwen3moe graph has experts in every layer"
    if not getattr(config, "norm_topk_prob", True):
        return "does not renormalise its chosen experts' weights (norm_topk_prob false); llama.cpp's qwen3moe does"
    return None


def _moe_metadata(writer: Any, config: Any) -> None:
    writer.add_expert_count(config.num_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_expert_feed_forward_length(config.moe_intermediate_size)


def _gpt2_problem(config: Any) -> str | None:
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) or getattr(config, "reorder_and_upcast_attn", False):
        return "scales attention per layer, which llama.cpp's gpt2 graph does not"
    return None


_LLAMA_LIKE = dict(permute_qk=True, rope_scalings=("llama3", "linear", "yarn"))

# transformers class -> how llama.cpp takes it; convert_hf_to_gguf.py registers MistralForCausalLM as LlamaModel.
ARCHITECTURES = {
    "LlamaForCausalLM": Architecture("llama", **_LLAMA_LIKE),
    "MistralForCausalLM": Architecture("llama", **_LLAMA_LIKE),
    "Qwen2ForCausalLM": Architecture("qwen2"),
    # Qwen3 is Qwen2 with a per-head RMSNorm on q and k (attn_q_norm / attn_k_norm) and no q/k/v biases; its
    # head_dim is its own (key_length / value_length).
    "Qwen3ForCausalLM": Architecture("qwen3"),
    "Qwen3MoeForCausalLM": Architecture("qwen3moe", extra_metadata=_moe_metadata, problem=_moe_problem),
    # Gemma: embeddings scaled by sqrt(hidden) and GELU-tanh in llama.cpp's graph itself; norms (1 + w).
    "Gemma2ForCausalLM": Architecture(
        "gemma2",
        norm_shift=1.0,
        extra_metadata=_gemma2_metadata,
        problem=_gemma2_problem,
        ties_output=True,
    ),
    "Gemma3ForCausalLM": Architecture(
        "gemma3", norm_shift=1.0, rope_scalings=("linear",), extra_metadata=_gemma3_metadata, problem=_gemma3_problem
    ),
    # Phi-3 keeps q/k/v and gate/up fused (attn_qkv, ffn_up twice as wide), as llama.cpp's phi3 graph reads them.
    "Phi3ForCausalLM": Architecture("phi3", rope_scalings=(), extra_metadata=_phi3_metadata),
    "GPT2LMHeadModel": Architecture("gpt2", rope_scalings=(), problem=_gpt2_problem),
    "Olmo2ForCausalLM": Architecture("olmo2"),  # norms after attention and MLP only; q/k norms over all heads
    "GraniteForCausalLM": Architecture(
        "granite", permute_qk=True, extra_metadata=_granite_metadata, rope_scalings=("linear", "yarn")
    ),
    "SmolLM3ForCausalLM": Architecture("smollm3", **_LLAMA_LIKE, problem=_smollm3_problem),
}


def architecture_names(config: Any) -> list[str]:
    """The model classes a config names; a config built in code names none, so its causal-LM class stands in."""
    names = list(getattr(config, "architectures", None) or [])
    if not names:
        from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

        model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config))
        names = [model_class.__name__] if model_class is not None else []
    return names


def architecture_of(config: Any) -> Architecture | None:
    return next((ARCHITECTURES[name] for name in architecture_names(config) if name in ARCHITECTURES), None)


def architecture_problem(config: Any) -> str | None:
    """Why llama.cpp cannot run a model of this config as transformers does (a phrase after the model's name)."""
    arch = architecture_of(config)
    if arch is None:
        found = ", ".join(architecture_names(config)) or f"model_type {config.model_type!r}"
        families = sorted(
            {name.removesuffix("ForCausalLM").removesuffix("LMHeadModel") for name in ARCHITECTURES}, key=str.lower
        )
        return f"is a {found}; GGUF export supports {', '.join(families)}"
    rope_type = rope_kind(config)
    if rope_type not in (None, "default", *arch.rope_scalings):
        return f"uses RoPE scaling {rope_type!r}, which GGUF export does not write for {arch.gguf_name} models"
    if getattr(config, "mlp_bias", False) or (arch.gguf_name == "llama" and getattr(config, "attention_bias", False)):
        return "has bias terms llama.cpp's Llama graph does not take"
    return arch.problem(config) if arch.problem else None


# ---- RoPE ------------------------------------------------------------------------------------------------------


def _global_rope(config: Any) -> dict[str, Any]:
    params = rope_parameters(config)
    return dict(params.get("full_attention", params))  # Gemma 3: the global layers' settings


def rope_theta(config: Any) -> float:
    return float(_global_rope(config).get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def rope_kind(config: Any) -> str | None:
    params = _global_rope(config)
    return params.get("rope_type", params.get("type"))


def _add_rope(writer: Any, config: Any, head_dim: int) -> None:
    """Base, rotated size and the scaling keys of TextModel.set_gguf_parameters (llama3 is a tensor instead)."""
    import gguf

    writer.add_rope_freq_base(rope_theta(config))
    partial = float(_global_rope(config).get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", 1.0))
    writer.add_rope_dimension_count(int(partial * head_dim))
    params, kind = _global_rope(config), rope_kind(config)
    if kind in ("linear", "yarn"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if kind == "linear" else gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(params["factor"]))
    if kind == "yarn" and params.get("original_max_position_embeddings"):
        writer.add_rope_scaling_orig_ctx_len(int(params["original_max_position_embeddings"]))


def llama3_rope_factors(config: Any, head_dim: int) -> Any:
    """Llama 3.1's frequency-dependent scaling as one factor per rotary frequency (what llama.cpp divides each
    frequency by): high frequencies (short wavelengths) kept, low ones divided by `factor`, a smooth blend between."""
    import numpy as np

    params = _global_rope(config)
    factor, low, high = float(params["factor"]), float(params["low_freq_factor"]), float(params["high_freq_factor"])
    context = float(params["original_max_position_embeddings"])
    frequencies = 1.0 / rope_theta(config) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
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


# ---- metadata --------------------------------------------------------------------------------------------------


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def add_hyperparameters(writer: Any, config: Any, arch: Architecture, name: str, vocab_size: int) -> None:
    """The metadata TextModel.set_gguf_parameters writes, then the family's own keys."""
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_vocab_size(vocab_size)
    if arch.gguf_name == "gpt2":  # learned positions, LayerNorm, a 4x MLP unless n_inner says otherwise
        writer.add_feed_forward_length(getattr(config, "n_inner", None) or 4 * config.hidden_size)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
    else:
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        head_dim = head_dim_of(config)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        _add_rope(writer, config, head_dim)
    if arch.extra_metadata:
        arch.extra_metadata(writer, config)


# ---- tensors ---------------------------------------------------------------------------------------------------

_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
_EXPERT_PARTS = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}


def tensors(
    folder: Path, files: list[Path], config: Any, arch: Architecture, *, shapes_only: bool = False
) -> Iterator[tuple[str, Any]]:
    """(llama.cpp name, float32 numpy array) for every weight, transformed as llama.cpp's converter does, one at a
    time: each is read when it is asked for, so a caller that writes it before asking for the next holds about one
    tensor (a mixture-of-experts layer's experts until the layer is complete).

    With `shapes_only`, nothing is read: the same transforms run on shape-only torch tensors (device "meta"), and
    each is yielded as one, with the name, shape and number of dimensions its array will have. The export plans
    the file from these (its tensor infos come before any data) and then writes the arrays of a second pass: one
    set of rules gives both, so they cannot drift apart.
    """
    name_map, tied = tensor_names(config, arch), output_tied(config, arch)
    experts: dict[int, dict[str, Any]] = {}
    written = set()
    for path in files:
        with _open_weights(path) as weights:
            for hf_name in weights.keys():  # noqa: SIM118 - safe_open is not a dict
                if hf_name.endswith(("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")):
                    continue  # buffers every runtime recomputes; old checkpoints carry them (convert skips them too)
                if tied and hf_name == "lm_head.weight":
                    continue  # llama.cpp reuses token_embd as the output when output.weight is absent
                data = _read(weights, hf_name, shapes_only)
                if ".mlp.experts." in hf_name:
                    yield from _stacked_experts(experts, hf_name, data, config)
                    continue
                gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise TunelabError(f"export: {path.name}: no llama.cpp name for tensor {hf_name!r}")
                if arch.gguf_name == "gpt2" and hf_name.endswith(_CONV1D):
                    data = data.T.contiguous()  # GPT-2's Conv1D stores (in, out); llama.cpp wants (out, in)
                if arch.norm_shift and hf_name.endswith("norm.weight"):
                    data = data + arch.norm_shift
                data = in_llama_cpp_row_order(data, hf_name, config, arch)
                written.add(gguf_name)
                yield gguf_name, _array(data)
                del data  # not held while the next one is read
    if experts and any(experts.values()):
        raise TunelabError(f"export: {folder}: incomplete expert weights in layers {sorted(experts)}")
    if not tied and "output.weight" not in written:
        raise TunelabError(f"export: {folder} has no lm_head.weight and does not tie it to the embeddings")
    if rope_kind(config) == "llama3":  # computed from the config, a few hundred bytes: the same in both passes
        yield "rope_freqs.weight", llama3_rope_factors(config, head_dim_of(config))


def _open_weights(path: Path) -> Any:
    """The safetensors file, its tensors read with pread(2) into memory of their own where safetensors can (0.8+).

    The default backend maps the whole file, and every page a tensor was read from stays resident in this process
    until the file is closed: a peak the size of the file again, if only of page cache. With pread, a tensor's
    memory is freed with the tensor.
    """
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", backend="pread")
    except TypeError:  # safetensors before 0.8 has no backend argument: mapped, as it always was
        return safe_open(str(path), framework="pt")


def _read(weights: Any, hf_name: str, shapes_only: bool) -> Any:
    """One weight as a float32 torch tensor, or only its shape (a "meta" tensor, no data) from the file's header."""
    import torch

    if shapes_only:
        return torch.empty(weights.get_slice(hf_name).get_shape(), dtype=torch.float32, device="meta")
    return weights.get_tensor(hf_name).float()


def _array(data: Any) -> Any:
    """The numpy array the file gets; a shape-only tensor stays one (numpy has no array without data)."""
    return data if data.is_meta else data.numpy()


def _stacked_experts(buffer: dict[int, dict[str, Any]], hf_name: str, data: Any, config: Any) -> Iterator[tuple]:
    """llama.cpp keeps each layer's experts as one 3-D tensor per projection (Qwen2MoeModel.modify_tensors):
    per-expert checkpoints are gathered until a layer is complete; fused ones (gate_up_proj) are split."""
    import torch

    layer = int(hf_name.split(".layers.")[1].split(".")[0])
    if hf_name.endswith("experts.gate_up_proj") or hf_name.endswith("experts.gate_up_proj.weight"):
        gate, up = data.chunk(2, dim=-2)  # (experts, 2 * ff, hidden)
        yield f"blk.{layer}.ffn_gate_exps.weight", _array(gate.contiguous())
        yield f"blk.{layer}.ffn_up_exps.weight", _array(up.contiguous())
        return
    if hf_name.endswith("experts.down_proj") or hf_name.endswith("experts.down_proj.weight"):
        yield f"blk.{layer}.ffn_down_exps.weight", _array(data)
        return
    parts = buffer.setdefault(layer, {})
    parts[hf_name] = data
    if len(parts) < 3 * config.num_experts:
        return
    prefix = hf_name.split(".experts.")[0]
    for part, gguf_part in _EXPERT_PARTS.items():
        stacked = torch.stack([parts[f"{prefix}.experts.{e}.{part}.weight"] for e in range(config.num_experts)])
        yield f"blk.{layer}.{gguf_part}.weight", _array(stacked)
        del stacked  # one projection's stack at a time
    buffer[layer] = {}  # the layer's per-expert tensors are released once its stacks are written


def tensor_names(config: Any, arch: Architecture) -> Any:
    """gguf's table of llama.cpp tensor names for the family (its `get_name(hf_name)` gives the file's name)."""
    import gguf

    return gguf.get_tensor_name_map(gguf_arch(arch.gguf_name), config.num_hidden_layers)


def output_tied(config: Any, arch: Architecture) -> bool:
    """Whether the file has no output head of its own (llama.cpp reuses token_embd)."""
    return bool(getattr(config, "tie_word_embeddings", False)) or arch.ties_output


def in_llama_cpp_row_order(rows: Any, name: str, config: Any, arch: Architecture) -> Any:
    """The rows of a Q or K projection's weight, bias or LoRA B (`name` the weight's, its module's or its bias's)
    in the order llama.cpp's RoPE wants them (LlamaModel.permute; a family without it: as they are); any other
    tensor as it is."""
    if not arch.permute_qk:
        return rows
    module = name.removesuffix(".weight").removesuffix(".bias")
    n_head = config.num_attention_heads
    if module.endswith("q_proj"):
        return permute_heads(rows, n_head, n_head)
    if module.endswith("k_proj"):
        return permute_heads(rows, n_head, getattr(config, "num_key_value_heads", None) or n_head)
    return rows


def gguf_arch(name: str) -> Any:
    import gguf

    return next(arch for arch, arch_name in gguf.MODEL_ARCH_NAMES.items() if arch_name == name)


def permute_heads(weights: Any, n_head: int, n_head_kv: int) -> Any:
    """LlamaModel.permute in convert_hf_to_gguf.py: each head's rotate-half rows to interleaved pairs."""
    if n_head_kv != n_head:
        n_head = n_head_kv
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
