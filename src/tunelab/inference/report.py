"""The evaluation/ folder of a run and the Evaluation section of its model card, as `tunelab evaluate` writes them
for language models (evaluate.py) and classifiers (evaluate_classifier.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.outputs import write_json

REPORT_DIR = "evaluation"


def publish_report(
    folder: Path, results: dict[str, Any], markdown: str, card: list[str], pictures: Any = None
) -> Path:
    """evaluation/ written beside (results.json, report.md and what `pictures(staging)` draws), then swapped in whole;
    the model card's Evaluation section replaced by `card`."""
    staging = folder / f".{REPORT_DIR}.partial"
    final = folder / REPORT_DIR
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        if pictures is not None:
            pictures(staging)
        write_json(staging / "results.json", results)
        (staging / "report.md").write_text(markdown, encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        _update_model_card(folder, card)
    except OSError as error:  # a full disk, a read-only run folder: the path, not a traceback
        raise TunelabError(f"evaluate: cannot write the report into {folder}: {error.strerror or error}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone after the swap; left only by a failure
    return final


def _update_model_card(folder: Path, card: list[str]) -> None:
    path = folder / "README.md"
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8")
    text = text.split("\n## Evaluation\n")[0].rstrip("\n")
    section = ["", "## Evaluation", "", *card]
    section += ["", f"Details: [{REPORT_DIR}/report.md]({REPORT_DIR}/report.md)", ""]
    tmp = path.with_name("README.md.tmp")
    tmp.write_text(text + "\n" + "\n".join(section), encoding="utf-8")
    os.replace(tmp, path)
