"""Each speed switch leaves the training itself unchanged: same losses with it on and off."""

from __future__ import annotations

import json

import pytest

import tunelab
from tests.conftest import train_losses


def _run(tiny_llama, tmp_path, name, **switches):
    rows = [{"prompt": f"Spell {w}:", "completion": " " + " ".join(w)} for w in ["cat", "house", "tree", "river"] * 8]
    data = tmp_path / "data.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    folder = tunelab.train(
        model=str(tiny_llama),
        data_path=str(data),
        trainer="sft",
        max_steps=6,
        lr=1e-3,
        batch_size=4,
        gradient_accumulation=1,
        block_size=64,
        model_max_length=128,
        disable_gradient_checkpointing=True,
        project_name=str(tmp_path / name),
        **switches,
    )
    return train_losses(folder)


def test_fast_loss_switch_gives_the_same_training(tiny_llama, tmp_path):
    fast = _run(tiny_llama, tmp_path, "fast", fast_loss=True)
    plain = _run(tiny_llama, tmp_path, "plain", fast_loss=False)
    assert fast == pytest.approx(plain, rel=1e-4)


@pytest.mark.slow
def test_torch_compile_switch_gives_the_same_training(tiny_llama, tmp_path):
    eager = _run(tiny_llama, tmp_path, "eager")
    compiled = _run(tiny_llama, tmp_path, "compiled", torch_compile=True)
    assert compiled == pytest.approx(eager, rel=1e-3)
