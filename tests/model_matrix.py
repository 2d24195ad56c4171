"""The model matrix: every model family users bring, through every step of tunelab, each cell run for real.

A tiny random model of each family is built from its config (the test tokenizer of tests/conftest.py, no
downloads), then trained and used through the CLI exactly as a user would: SFT with LoRA and full, DPO with LoRA,
text classification, generate, merge, export. A cell either works or is refused with one `tunelab: error:` line;
a traceback is a failure of tunelab (tests/test_model_matrix.py fails on one).

    python tests/model_matrix.py --write      (writes docs/models.md; tests/test_model_matrix.py checks it is current)
    python tests/model_matrix.py qwen3 gpt2   (prints the rows of some families)
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "alpaca.jsonl"
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def _llama3_scaling() -> dict:
    return {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128,
    }


def family_configs(vocab_size: int, bos: int, eos: int) -> dict[str, object]:
    """One tiny config per family, in the shapes the real models use (tied or not, QK-norm, MoE, soft-capping)."""
    import transformers as t

    ids = dict(vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    rope = dict(**TINY, **ids, max_position_embeddings=512)
    return {
        "llama": t.LlamaConfig(**rope, tie_word_embeddings=True),
        "llama (llama3 RoPE scaling)": t.LlamaConfig(**rope, rope_scaling=_llama3_scaling()),
        "mistral": t.MistralConfig(**rope, sliding_window=None),
        "qwen2": t.Qwen2Config(**rope, tie_word_embeddings=True),
        "qwen3": t.Qwen3Config(**rope, head_dim=16, tie_word_embeddings=True),
        "qwen3_moe": t.Qwen3MoeConfig(
            **rope,
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            decoder_sparse_step=1,
            norm_topk_prob=True,  # as Qwen3-30B-A3B
        ),
        "gemma2": t.Gemma2Config(**rope, head_dim=16, sliding_window=64, query_pre_attn_scalar=16),
        "gemma3_text": t.Gemma3TextConfig(**rope, head_dim=16, sliding_window=64, query_pre_attn_scalar=16),
        "phi3": t.Phi3Config(**rope, original_max_position_embeddings=512),
        "gpt2": t.GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=512, **_ids(bos, eos)),
        "olmo2": t.Olmo2Config(**rope),
        "granite": t.GraniteConfig(**rope),
        "smollm3": t.SmolLM3Config(**rope, tie_word_embeddings=True),
    }


def _ids(bos: int, eos: int) -> dict:
    return dict(bos_token_id=bos, eos_token_id=eos)


@dataclass
class Cell:
    status: str  # "works", "refused" or "traceback"
    detail: str = ""


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """tunelab's CLI in this process, its stdout and stderr captured; an escaping exception is a traceback."""
    import traceback

    from tunelab.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except BaseException:  # noqa: BLE001 - the matrix records what escaped
            traceback.print_exc(file=err)
            code = 1
    return code, out.getvalue(), err.getvalue()


def judge(code: int, err: str, done: Callable[[], bool]) -> Cell:
    errors = [line for line in err.splitlines() if line.startswith("tunelab: error:")]
    if code == 0 and done() and "Traceback" not in err:
        return Cell("works")
    if code == 2 and len(errors) == 1 and "Traceback" not in err:
        return Cell("refused", errors[0].removeprefix("tunelab: error: "))
    tail = [line for line in err.splitlines() if line.strip()][-1:] or [f"exit code {code}"]
    return Cell("traceback", tail[0][:200])


STEPS = ("sft LoRA", "sft full", "dpo LoRA", "text classification", "generate", "merge", "export f16")


def run_family(name: str, config: object, tokenizer_dir: Path, work: Path) -> dict[str, Cell]:
    """Every step of STEPS for one family (generate, merge and export use the sft LoRA run)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = work / name.split()[0]  # the folder's name is the model's name in the notes
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(model)
    for item in tokenizer_dir.iterdir():
        (model / item.name).write_bytes(item.read_bytes())
    data = work / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(SAMPLE.read_text(encoding="utf-8").splitlines(True)[:16]))
    pairs = [{"prompt": f"Question {i}?", "chosen": "A kind, full answer.", "rejected": "No."} for i in range(8)]
    (data / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    labels = [{"text": f"{word} review number {i}", "target": word} for i in range(8) for word in ("good", "bad")]
    (data / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in labels))
    common = ["--model", str(model), "--max-steps", "2", "--batch-size", "2", "--gradient-accumulation", "1"]
    lengths = ["--block-size", "128", "--model-max-length", "256"]
    cells: dict[str, Cell] = {}

    def train(step: str, project: str, *args: str) -> None:
        folder = work / project
        code, _, err = run_cli(["llm", "--train", *common, *lengths, "--project-name", str(folder), *args])
        cells[step] = judge(code, err, lambda: (folder / "tunelab_run.json").is_file())

    alpaca = ["--data-path", str(data / "train.jsonl"), "--text-column", "output"]
    alpaca += ["--prompt-text-column", "instruction", "--trainer", "sft"]
    train("sft LoRA", "sft-lora-run", *alpaca, "--peft", "--lr", "1e-3")
    train("sft full", "sft-full-run", *alpaca, "--lr", "1e-4")
    train("dpo LoRA", "dpo-lora-run", "--data-path", str(data / "pairs.jsonl"), "--trainer", "dpo", "--peft",
          "--max-prompt-length", "32")  # fmt: skip
    folder = work / "classifier-run"
    code, _, err = run_cli([
        "text-classification", "--train", *common, "--data-path", str(data / "labels.jsonl"),
        "--max-seq-length", "64", "--project-name", str(folder),
    ])  # fmt: skip
    cells["text classification"] = judge(code, err, lambda: (folder / "tunelab_run.json").is_file())

    lora = work / "sft-lora-run"
    if cells["sft LoRA"].status != "works":
        for step in ("generate", "merge", "export f16"):
            cells[step] = Cell("refused", "needs the sft LoRA run")
        return cells
    code, out, err = run_cli(["generate", "--model", str(lora), "--max-new-tokens", "8", "Say hi."])
    cells["generate"] = judge(code, err, lambda: out.endswith("\n"))  # a random model may say nothing
    merged = work / "merged"
    code, _, err = run_cli(["merge", "--model", str(lora), "--output", str(merged)])
    cells["merge"] = judge(code, err, lambda: (merged / "config.json").is_file())
    gguf = work / "model.gguf"
    code, _, err = run_cli(["export", "--model", str(lora), "--output", str(gguf), "--dtype", "f16"])
    cells["export f16"] = judge(code, err, lambda: gguf.is_file())
    return cells


def run_matrix(families: list[str] | None = None) -> dict[str, dict[str, Cell]]:
    sys.path.insert(0, str(ROOT))
    from tests.conftest import build_tokenizer

    with tempfile.TemporaryDirectory(prefix="tunelab-matrix-") as tmp:
        tokenizer_dir = Path(tmp) / "tokenizer"
        tokenizer = build_tokenizer(tokenizer_dir)
        # Room beyond the tokenizer's tokens, as real models leave (their vocab is padded to a multiple of 64 or
        # 128): a tokenizer class may add a special token of its own (Qwen2's adds <|endoftext|>).
        configs = family_configs(len(tokenizer) + 8, tokenizer.bos_token_id, tokenizer.eos_token_id)
        matrix = {}
        for name in families or list(configs):
            work = Path(tmp) / name.split()[0].replace("/", "_") / str(len(matrix))
            work.mkdir(parents=True)
            cells = run_family(name, configs[name], tokenizer_dir, work)
            for cell in cells.values():  # the notes name no temporary folder
                cell.detail = cell.detail.replace(str(work) + "/", "").replace(str(work), ".")
            matrix[name] = cells
        return matrix


def render(matrix: dict[str, dict[str, Cell]]) -> str:
    marks = {"works": "yes", "refused": "refused", "traceback": "FAILS"}
    lines = [
        "# Models",
        "",
        "<!-- generated by `python tests/model_matrix.py --write`; checked current by tests/test_model_matrix.py -->",
        "",
        "Which model families go through which step of tunelab, as measured: a tiny random model of each family",
        "(built from its config, the test tokenizer) trained and used through the CLI as a user would. `yes`: the",
        "step works; `refused`: tunelab stops up front with the line in the notes below, exit code 2. Each",
        "exported file is then judged by llama.cpp itself in tests/test_export_families.py: the same logits and",
        "greedy tokens as transformers, for every family here.",
        "",
        "| family | " + " | ".join(STEPS) + " |",
        "| --- | " + " | ".join("---" for _ in STEPS) + " |",
    ]
    notes = []
    for name, cells in matrix.items():
        shown = []
        for step in STEPS:
            cell = cells[step]
            shown.append(marks[cell.status] + (f" [{len(notes) + 1}]" if cell.detail else ""))
            if cell.detail:
                notes.append(f"{name}, {step}: {cell.detail}")
        lines.append(f"| {name} | " + " | ".join(shown) + " |")
    if notes:
        lines += ["", "Notes:", ""] + [f"{number}. {note}" for number, note in enumerate(notes, start=1)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    families = [name for name in sys.argv[1:] if name != "--write"]
    text = render(run_matrix(families or None))
    if "--write" in sys.argv:  # to the file itself: libraries print stray lines to stdout while models are saved
        (ROOT / "docs" / "models.md").write_text(text, encoding="utf-8")
    else:
        print(text, end="")
