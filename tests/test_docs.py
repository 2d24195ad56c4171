"""The docs that are generated from code are current, and the README's commands exist."""

from __future__ import annotations

from pathlib import Path

from tunelab.config.docs import render_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_config_reference_is_current():
    assert (ROOT / "docs" / "config.md").read_text() == render_markdown(), (
        "docs/config.md is stale: run `python -m tunelab.config.docs > docs/config.md`"
    )


def test_readme_sample_and_scripts_exist():
    readme = (ROOT / "README.md").read_text()
    assert "samples/alpaca.jsonl" in readme and (ROOT / "samples" / "alpaca.jsonl").is_file()
    assert "bash scripts/install.sh" in readme and (ROOT / "scripts" / "install.sh").is_file()
    assert "bash .ci/run" in readme and (ROOT / ".ci" / "run").is_file()


def test_shipped_configs_parse():
    from tunelab import load_config

    configs = sorted((ROOT / "configs").rglob("*.y*ml"))
    assert len(configs) >= 2
    for path in configs:
        params = load_config(path)
        assert params.trainer == "sft" and (params.peft or params.distributed_backend == "fsdp")
