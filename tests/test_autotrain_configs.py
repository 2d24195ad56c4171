"""AutoTrain's own example configs, unchanged: each stops at once with one line naming what this machine lacks."""

from __future__ import annotations

import pytest

from tests.conftest import SHARED
from tunelab.cli import main

CONFIGS = sorted((SHARED / "autotrain-configs").glob("*.yml"))
LACKS = ("CUDA", "hub is out of reach")


@pytest.mark.skipif(not CONFIGS, reason="../shared/autotrain-configs not present")
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_unchanged_config_stops_with_one_clear_line(path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # project_name is relative: nothing may appear here
    monkeypatch.setenv("HF_USERNAME", "someone")
    monkeypatch.setenv("HF_TOKEN", "hf_do_not_print_me")
    code = main(["--config", str(path)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("tunelab: error:")]
    assert code == 2, err
    assert len(errors) == 1 and any(reason in errors[0] for reason in LACKS), err
    assert "Traceback" not in err and "hf_do_not_print_me" not in err
    assert list(tmp_path.iterdir()) == []
