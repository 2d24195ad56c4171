"""Exporting a model folder to one GGUF file: the format llama.cpp, Ollama and LM Studio load.

`tunelab export --format gguf` calls `export_run`: a run folder holding a LoRA adapter is merged into its base
first (its `merged/` copy when the run kept one, else a temporary merge, inference/merge.py), then `export_gguf`
writes the plain transformers model folder. The file written mirrors what llama.cpp's own converter,
`convert_hf_to_gguf.py`, writes for the same model: the same metadata keys, tensor names, Q/K row order, tensor
types and tokenizer, so llama.cpp-compatible readers (and transformers' `gguf_file=` loader) take it as theirs.
What differs per family is in gguf_architectures.py, the tokenizer in gguf_tokenizer.py; this module holds the
types, the file's safety and the order of the steps.

The file is written beside its final name and renamed into place at the end, so an export that fails or is
interrupted never leaves a half-written .gguf under the name asked for.

Tensors are streamed, as convert_hf_to_gguf.py streams them: a GGUF file lists every tensor's name, shape, type
and offset before any data, so a first pass plans the file from the safetensors headers alone (no weights read),
the header and tensor infos are written, then a second pass reads, transforms, converts and writes one tensor at a
time. An export holds about one tensor in memory, not the whole model (gguf's `add_tensor` queues every array until
the file is written: 16-32 GB for an 8B model). Both passes come from gguf_architectures.tensors, and the second is
checked against the first tensor by tensor, so a disagreement is an error, never a file whose infos lie.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

from tunelab.errors import TunelabError
from tunelab.inference.gguf_architectures import (
    Architecture,
    add_hyperparameters,
    architecture_of,
    architecture_problem,
    tensors,
)
from tunelab.inference.gguf_tokenizer import add_tokenizer
from tunelab.models.vision import reads_images
from tunelab.outputs import base_model_of, check_run_folder

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
FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0"}  # LlamaFileType


class PlannedTensor(NamedTuple):
    """One tensor as the file's tensor infos describe it, before its data is read."""

    name: str  # llama.cpp's name
    shape: tuple[int, ...]  # in numpy's order (rows first), as transformers and the transforms give it
    qtype: Any  # gguf.GGMLQuantizationType: the type the file stores it in
    nbytes: int  # its size in the file, padding not included


def export_run(model: str | Path, output: str | Path, dtype: str = "f16") -> Path:
    """Export a run folder or model folder to one GGUF file; a LoRA adapter is merged into its base first.

    Returns the path of the written file; raises TunelabError as `export_gguf` does, before anything is written.
    """
    from tunelab.inference.merge import check_causal_lm_run, merge_run

    folder = check_run_folder(model, "export")
    check_causal_lm_run(folder, "export")
    if not (folder / "adapter_config.json").is_file():
        return export_gguf(folder, output, dtype)
    if (folder / "merged" / "config.json").is_file():
        return export_gguf(folder / "merged", output, dtype)
    _check_dtype(dtype)  # a bad dtype is known before minutes of merging
    from tunelab.models.load import load_config, resolve_model

    base = load_config(resolve_model(base_model_of(folder)))
    if reads_images(base):  # known from the base's config, not after the merge
        raise TunelabError(f"export: {folder} {export_problem(base)}")
    with tempfile.TemporaryDirectory(prefix="tunelab-merge-") as tmp:
        log.info("export: merging the LoRA adapter into its base first")
        # Kept in float32 (bf16 for a bf16 file): the file's type is then the only rounding of the merged weights.
        merged = merge_run(folder, Path(tmp) / "merged", "bfloat16" if dtype == "bf16" else "float32")
        try:
            return export_gguf(merged, output, dtype, name=folder.name)  # the run's name, not the temporary one
        except TunelabError as err:  # name the user's run, not the temporary merge
            raise TunelabError(str(err).replace(str(merged), f"{folder} (merged with its base)")) from None


def export_gguf(model_dir: str | Path, output: str | Path, dtype: str = "f16", name: str | None = None) -> Path:
    """Write the model in `model_dir` to one GGUF file at `output`, its weights in `dtype`.

    Args:
        model_dir: a transformers model folder (config.json, safetensors weights, tokenizer files), or a tunelab
            run folder holding full weights or a `merged/` folder.
        output: the .gguf file to write (replaced if it exists; its folder is created).
        dtype: "f32", "f16" (the default), "bf16" or "q8_0" (8-bit blocks, about half the size of f16).
            Norms and other 1-D tensors stay f32 in every case, as llama.cpp expects.
        name: the model's name in the file (general.name); default: the folder's (its run's for `merged/`).

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
    import numpy as np

    writer = gguf.GGUFWriter(None, arch.gguf_name)
    vocab_size = add_tokenizer(writer, folder, config)
    name = name or (folder.parent.name if folder.name == "merged" else folder.name)
    add_hyperparameters(writer, config, arch, name, vocab_size)
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[qtype_name]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # Pass 1, before the output is touched: what cannot be exported (a tensor without a llama.cpp name, missing
    # experts or head) is found here, from the headers alone.
    plan = plan_tensors(folder, config, arch, qtype_name)
    for tensor in plan:
        # raw_dtype is the type; the numpy dtype given only matters to gguf when it is uint8 (a quantized byte shape)
        writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), tensor.nbytes, raw_dtype=tensor.qtype)

    partial = target.with_name(f".{target.name}.partial")
    unquantized = target.with_name(f".{target.name}.f16.partial")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        writer.write_header_to_file(unquantized if dtype in BY_LLAMA_CPP else partial)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        _write_tensors(writer, plan, folder, config, arch)  # pass 2
        writer.close()
        if dtype in BY_LLAMA_CPP:
            _quantize_with_llama_cpp(unquantized, partial, dtype)
        os.replace(partial, target)
    except OSError as error:  # a full disk, a read-only folder: the path, not a traceback
        raise TunelabError(f"export: cannot write {target}: {error.strerror or error}") from error
    finally:  # interrupted or failed too: no partial file left behind (gone after the rename when it succeeded)
        # Each step on its own: closing after a failed write can fail again (the disk is still full), and that
        # must not keep the partial files from being removed; nor may a folder that never existed fail here.
        for cleanup in (writer.close, partial.unlink, unquantized.unlink):
            with contextlib.suppress(OSError):
                cleanup()
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
    """llama.cpp's quantizer (what `llama-quantize` runs) from the f16 file to `dtype`, with its default rules.

    Its log (a line per tensor) goes through llama-cpp-python's logger: kept to errors while it runs, so an
    export prints tunelab's lines, not hundreds of llama.cpp's.
    """
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, BY_LLAMA_CPP[dtype])
    params.nthread = os.cpu_count() or 1
    log.info("export: quantizing to %s with llama.cpp", dtype)
    llama_log = logging.getLogger("llama-cpp-python")
    level = llama_log.level
    llama_log.setLevel(max(level, logging.ERROR))
    try:
        failed = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0
    finally:
        llama_log.setLevel(level)
    if failed:
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


def _check_architecture(config: Any, folder: Path) -> Architecture:
    problem = export_problem(config)
    if problem:
        raise TunelabError(f"export: {folder} {problem}")
    return architecture_of(config)


def export_problem(config: Any) -> str | None:
    """Why a model of this config cannot be exported to GGUF (a phrase after the model's name), or None when it
    can. The dry run asks it too, so a run learns before training that its result will not export."""
    if reads_images(config):
        return (
            f"is a vision-language model ({config.model_type}): llama.cpp reads its vision tower from a separate "
            "mmproj file, which tunelab does not write yet (tunelab merge gives a transformers model that generate "
            "and serve load)"
        )
    return architecture_problem(config)


def plan_tensors(folder: Path, config: Any, arch: Architecture, qtype_name: str) -> list[PlannedTensor]:
    """Every tensor's name, shape, type and size in the file, in the order they are written, from the safetensors
    headers and the family's transforms run on shapes alone (gguf_architectures.tensors with shapes_only)."""
    planned = []
    for gguf_name, shape_only in tensors(folder, _weight_files(folder), config, arch, shapes_only=True):
        shape = tuple(int(size) for size in shape_only.shape)
        qtype = _file_type(gguf_name, shape, qtype_name)
        planned.append(PlannedTensor(gguf_name, shape, qtype, _nbytes(shape, qtype)))
    return planned


def _write_tensors(writer: Any, plan: list[PlannedTensor], folder: Path, config: Any, arch: Architecture) -> None:
    """Pass 2: each tensor read, transformed, converted and written before the next is read, each checked against
    its planned info first (gguf's write_tensor_data only asserts the size, and only without -O)."""
    written = 0
    for gguf_name, data in tensors(folder, _weight_files(folder), config, arch):
        planned = plan[written] if written < len(plan) else None
        if planned is None or (gguf_name, tuple(data.shape)) != (planned.name, planned.shape):
            expected = f"{planned.name} {list(planned.shape)}" if planned else "no more tensors"
            raise _plan_mismatch(folder, f"{gguf_name} {list(data.shape)}", expected)
        array = _quantize(data, planned.qtype)
        if array.nbytes != planned.nbytes:
            raise _plan_mismatch(folder, f"{gguf_name}: {array.nbytes} bytes", f"{planned.nbytes} bytes")
        writer.write_tensor_data(array)
        written += 1
        del data, array  # released before the next tensor is read
    if written != len(plan):
        raise _plan_mismatch(folder, f"{written} tensors", f"{len(plan)} tensors")


def _plan_mismatch(folder: Path, got: str, expected: str) -> TunelabError:
    # A bug in a family's rules, never the user's input: the file's infos would not describe its data.
    return TunelabError(
        f"export: {folder}: the weights gave {got} where the file's tensor infos say {expected}; nothing was written "
        "(a tunelab bug: please report it)"
    )


def _file_type(gguf_name: str, shape: tuple[int, ...], qtype_name: str) -> Any:
    """The tensor's type in the file; the choices follow ModelBase.prepare_tensors in convert_hf_to_gguf.py."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    qtype = GGMLQuantizationType[qtype_name]
    # llama.cpp's kernels for norms and other 1-D tensors take f32 only; the MoE router and learned positions
    # stay f32 too, as llama.cpp's converter and quantizer keep them.
    if len(shape) <= 1 or gguf_name.endswith(("_norm.weight", "ffn_gate_inp.weight", "position_embd.weight")):
        return GGMLQuantizationType.F32
    if shape[-1] % GGML_QUANT_SIZES[qtype][0]:  # a row length that is not a whole number of Q8_0 blocks (32 values)
        # gguf's own words (quants.QuantError), as when the export asked gguf to quantize it and it refused
        log.warning("export: %s: Can't quantize tensor with shape %s to %s; writing it as f16", gguf_name, shape,
                    qtype.name)  # fmt: skip
        return GGMLQuantizationType.F16
    return qtype


def _nbytes(shape: tuple[int, ...], qtype: Any) -> int:
    from gguf import GGML_QUANT_SIZES

    block_size, type_size = GGML_QUANT_SIZES[qtype]  # _file_type chose a type whose blocks divide the rows
    return math.prod(shape) // block_size * type_size


def _quantize(data: Any, qtype: Any) -> Any:
    """The tensor's bytes in the file's type (a float32 array for F32, float16 for F16, uint8 blocks for the rest)."""
    import numpy as np
    from gguf import quants

    return quants.quantize(data.astype(np.float32, copy=False), qtype)
