"""A LoRA run's adapter as llama.cpp's adapter file: `tunelab export --format gguf-lora`.

llama.cpp applies a LoRA adapter GGUF on top of a GGUF of the base model when it loads (llama-cli `--lora`,
llama-server, llama-cpp-python's `lora_path`, an Ollama Modelfile's `ADAPTER` line): a file of a few MB beside the
base, where a merged export copies the whole model. For each adapted weight the file holds the two LoRA factors
under the weight's llama.cpp name plus `.lora_a` ([r, in]) and `.lora_b` ([out, r]), and one alpha; llama.cpp adds
scale * B(A x) to the weight's product, with scale = alpha / r (r read from each B) times the user's lora scale.

Three things differ from PEFT's layout, each done as the full export does it for the weight itself:
- the names are llama.cpp's (gguf's tensor-name table for the base's family);
- in the families whose Q and K rows the full export reorders (Llama's interleaved RoPE), B's rows are reordered
  the same way: B x's rows are the weight's output rows, and A is untouched;
- PEFT's scale of each module (lora_alpha / r; rsLoRA's lora_alpha / sqrt(r); rank_pattern, alpha_pattern) is
  read from PEFT itself, on a skeleton of the base (no weights), and where it is not the file's alpha / r the
  difference is folded into B, so llama.cpp computes what PEFT computes.

What an adapter file cannot carry is refused before anything is written, with the merged export as the way out:
DoRA's magnitudes, whole modules trained beside the adapter (modules_to_save, added tokens' rows), LoRA on the
embeddings or on a head tied to them (the base file has no head of its own), experts' fused parameters, trained
biases, and a base whose positions the run stretched (rope_scaling: the base's GGUF does not have the stretch).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.outputs import base_model_of, check_run_folder, rope_scaling_of_run

log = logging.getLogger("tunelab")

DTYPES = ("f32", "f16", "bf16")  # llama.cpp's converter writes these (f32 its default); the factors are small
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16"}  # gguf.LlamaFileType
PEFT_PREFIX = "base_model.model."  # PEFT's module names start with the wrapper's


def export_adapter(run: str | Path, output: str | Path, dtype: str = "f16") -> Path:
    """Write the LoRA adapter of `run` (a run folder, or any PEFT adapter folder) to one adapter GGUF at `output`,
    its factors in `dtype` (f32, f16, bf16). Returns the path written; TunelabError, before anything is written,
    for a dtype, folder or adapter llama.cpp's adapter format cannot take."""
    from tunelab.inference.export import export_problem
    from tunelab.inference.gguf_architectures import architecture_of
    from tunelab.inference.merge import check_causal_lm_run
    from tunelab.models.load import load_config, resolve_model

    if dtype not in DTYPES:
        raise TunelabError(f"export: --format gguf-lora writes {', '.join(DTYPES)}, not {dtype!r}")
    folder = check_run_folder(run, "export")
    check_causal_lm_run(folder, "export")
    if not (folder / "adapter_config.json").is_file():
        raise TunelabError(
            f"export: {folder} holds full weights, not a LoRA adapter: --format gguf-lora is for adapter runs "
            "(--format gguf exports the whole model)"
        )
    settings = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    problem = _adapter_problem(settings, rope_scaling_of_run(folder))
    if problem:
        raise TunelabError(f"export: {folder}: {problem}; `tunelab export --format gguf` exports it merged instead")
    base_name = base_model_of(folder)
    config = load_config(resolve_model(base_name))
    problem = export_problem(config)
    if problem:
        raise TunelabError(f"export: the base model {base_name} {problem}")
    arch = architecture_of(config)
    target = Path(os.path.expanduser(str(output))).absolute()
    if target.is_dir():
        raise TunelabError(f"export: --output {target} is a folder; give the path of the .gguf file to write")

    factors = list(_factors(folder, config, arch, settings))  # all of them read and checked before writing
    _write(target, factors, arch.gguf_name, _alpha(settings), dtype, folder.name)
    log.info(
        "export: wrote %s (LoRA adapter for %s: %d weights, %s, %.1f MB)",
        target,
        base_name,
        len(factors) // 2,
        dtype,
        target.stat().st_size / 1e6,
    )
    return target


def _adapter_problem(settings: dict[str, Any], rope_scaling: dict[str, Any] | None) -> str | None:
    """Why this adapter cannot be an adapter file (a phrase), or None."""
    if settings.get("peft_type", "LORA") != "LORA":
        return f"its adapter is {settings['peft_type']}, not LoRA"
    if settings.get("task_type") not in (None, "CAUSAL_LM"):
        return f"its adapter is for a {settings['task_type']} model, not a causal language model"
    init = settings.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "loftq", "eva")):
        # a checkpoint-N/ folder: the Trainer saves it before the run's adapter is converted (models/peft.py)
        return (
            f"its factors start from {init} and were saved before conversion, so they change a residual of the "
            "base, not the base: export the finished run folder, whose adapter is converted"
        )
    if settings.get("use_dora"):
        return "DoRA's magnitude vectors are not part of llama.cpp's adapter format"
    if settings.get("modules_to_save") or settings.get("trainable_token_indices"):
        return (
            "it trained whole modules or token rows beside the adapter (modules_to_save, added tokens), which an "
            "adapter file cannot carry"
        )
    if settings.get("target_parameters"):
        return "its LoRA adapts fused parameters (experts' gate_up_proj), which llama.cpp's adapters do not"
    if settings.get("bias", "none") != "none" or settings.get("lora_bias"):
        return "it trained biases, which llama.cpp's adapter format cannot carry"
    if settings.get("layer_replication") or settings.get("alora_invocation_tokens"):
        return "its layer replication or activated LoRA is not part of llama.cpp's adapter format"
    if rope_scaling:
        return "the run stretched its base's positions (rope_scaling), and the base's own GGUF does not"
    return None


def _factors(folder: Path, config: Any, arch: Any, settings: dict[str, Any]) -> Any:
    """(llama.cpp name, float32 array) for every .lora_a and .lora_b of the file, checked against the adapter's
    weights (each one used, each shape the module's)."""
    from safetensors import safe_open

    from tunelab.inference.gguf_architectures import in_llama_cpp_row_order, output_tied, tensor_names

    weights_file = folder / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise TunelabError(f"export: {folder} has no adapter_model.safetensors (save the adapter with safetensors)")
    name_map, tied = tensor_names(config, arch), output_tied(config, arch)
    alpha = _alpha(settings)
    with safe_open(str(weights_file), framework="pt") as weights:
        unused = set(weights.keys())  # every tensor must be a factor of an adapted weight (checked at the end)
        for module, rank, scale in _lora_modules(folder, config):
            hf_name = module.removeprefix(PEFT_PREFIX)
            if hf_name.split(".")[-1] in ("lm_head", "embed_out") and tied:
                raise TunelabError(
                    f"export: LoRA on {hf_name}, a head tied to the embeddings: the base's GGUF has no head of its "
                    "own to adapt; `tunelab export --format gguf` exports it merged instead"
                )
            gguf_name = name_map.get_name(f"{hf_name}.weight", try_suffixes=(".weight",))
            if gguf_name is None:
                raise TunelabError(f"export: no llama.cpp name for the adapted weight {hf_name!r}")
            keys = (f"{module}.lora_A.weight", f"{module}.lora_B.weight")
            missing = [key for key in keys if key not in unused]
            if missing:
                raise TunelabError(f"export: {weights_file} has no {missing[0]} for the adapted {hf_name}")
            unused.difference_update(keys)
            down, up = (weights.get_tensor(key).float() for key in keys)
            if down.shape[0] != rank or up.shape[1] != rank:
                raise TunelabError(f"export: {hf_name}: factors of rank {down.shape[0]}, the adapter says {rank}")
            # what B is multiplied by so that llama.cpp's alpha / r (with alpha 0: 1) gives PEFT's scale
            folded = scale * rank / alpha if alpha else scale
            if not math.isclose(folded, 1.0, rel_tol=1e-12):
                up = up * folded
            up = in_llama_cpp_row_order(up, hf_name, config, arch)  # B's rows are the weight's
            yield f"{gguf_name}.lora_a", down.contiguous().numpy()
            yield f"{gguf_name}.lora_b", up.contiguous().numpy()
    whole = sorted(key for key in unused if not key.endswith((".lora_A.weight", ".lora_B.weight")))
    if whole:  # an embedding saved for a resized vocabulary, a classifier's head: not factors llama.cpp adds
        raise TunelabError(
            f"export: {weights_file} holds {whole[0]}, a whole tensor beside the LoRA factors, which an adapter "
            "file cannot carry; `tunelab export --format gguf` exports it merged instead"
        )
    if unused:
        raise TunelabError(f"export: {weights_file} holds LoRA weights of no adapted module: {sorted(unused)[0]}")


def _alpha(settings: dict[str, Any]) -> float:
    """The adapter's lora_alpha (PEFT's default, 8, when its config leaves it out)."""
    return float(settings.get("lora_alpha", 8))


def _lora_modules(folder: Path, config: Any) -> list[tuple[str, int, float]]:
    """(PEFT module name, rank, scale) of every adapted module, as PEFT builds them on the base: on a skeleton of it
    (the meta device: no weights, no memory), so rank_pattern, alpha_pattern, rsLoRA and transformers' renamed
    layers are PEFT's own reading, not tunelab's."""
    import torch
    from peft import PeftModel
    from peft.tuners.lora import Embedding, LoraLayer, ParamWrapper
    from transformers import AutoModelForCausalLM

    from tunelab.models.peft import ignore_pattern_warnings, quiet_peft_save

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    with quiet_peft_save():
        ignore_pattern_warnings()
        # PEFT's notes on building the layers (GPT-2's Conv1D taken as fan_in_fan_out): about a skeleton only read
        warnings.filterwarnings("ignore", category=UserWarning, module="peft")
        try:
            model = PeftModel.from_pretrained(skeleton, str(folder), low_cpu_mem_usage=True)
        except (ValueError, RuntimeError, KeyError) as err:  # targets the base lacks, shapes that do not fit it
            reason = " ".join(line.strip() for line in str(err).strip().splitlines()[:2]) or type(err).__name__
            raise TunelabError(f"export: the adapter in {folder} does not fit its base model ({reason})") from None
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or not module.r:
            continue
        if isinstance(module, (Embedding, ParamWrapper)) or module.lora_embedding_A:
            raise TunelabError(
                f"export: LoRA on {name.removeprefix(PEFT_PREFIX)} (an embedding or fused parameters) is not part of "
                "llama.cpp's adapter files as tunelab writes them; `tunelab export --format gguf` exports it merged"
            )
        adapter = next(iter(module.r))
        found.append((name, int(module.r[adapter]), float(module.scaling[adapter])))
    if not found:
        raise TunelabError(f"export: the adapter in {folder} adapts no weight of its base")
    return found


def _write(target: Path, factors: list[tuple[str, Any]], arch_name: str, alpha: float, dtype: str, name: str) -> None:
    """The adapter file, written beside `target` and renamed into place (never half-written under its name)."""
    import gguf
    import numpy as np

    partial = target.with_name(f".{target.name}.partial")
    writer = gguf.GGUFWriter(str(partial), arch_name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[dtype]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for tensor_name, data in factors:
        if dtype == "bf16":  # gguf's own rounding, as the full export's
            bf16 = gguf.GGMLQuantizationType.BF16
            writer.add_tensor(tensor_name, gguf.quants.quantize(data, bf16), raw_dtype=bf16)
        else:
            writer.add_tensor(tensor_name, data.astype(np.float32 if dtype == "f32" else np.float16))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, target)
    except OSError as error:
        raise TunelabError(f"export: cannot write {target}: {error.strerror or error}") from error
    finally:
        for cleanup in (writer.close, partial.unlink):
            with contextlib.suppress(OSError):
                cleanup()
