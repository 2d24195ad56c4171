"""The data page's content: the file's columns and first rows, and the examples exactly as the trainer will see
them - `tunelab.tasks.plan`, the code behind `--dry-run` - or the error a run would stop with, on its field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config.base import RunParams
from tunelab.errors import ConfigError, DataError, TunelabError

SHOWN_ROWS = 5
SHOWN_CHARS = 300  # per cell of the raw-rows table


@dataclass
class Preview:
    """What the data and parameters pages show of a planned run."""

    columns: list[str] = field(default_factory=list)
    rows: list[dict[str, str]] = field(default_factory=list)
    plan: Any = None  # tunelab.tasks.dry_run.RunPlan
    errors: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The plan in plain values (for the page and the JSON API)."""
        if self.plan is None:
            return {}
        plan = self.plan
        return {
            "task": plan.task,
            "splits": [
                {"name": s.name, "examples": s.examples, "rows": s.rows, "lengths": s.length_line(), "notes": s.notes}
                for s in plan.splits
            ],
            "examples": plan.examples,
            "steps_per_epoch": plan.steps_per_epoch,
            "total_steps": plan.total_steps,
            "effective_batch": plan.effective_batch,
            "memory": plan.memory.describe() if plan.memory is not None else None,
            "fits": plan.fits,
            "notes": plan.notes,
            "label_counts": plan.label_counts,
            "text": plan.render(),
        }


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """(columns, the first rows with long values cut) of a data file; DataError as training would raise it."""
    from tunelab.data.sources import read_file

    split = read_file(path, "train")
    shown = [{k: _cut(v) for k, v in row.items()} for row in split.rows[:SHOWN_ROWS]]
    return split.columns, shown


def preview(settings: dict[str, Any], params: RunParams | None) -> Preview:
    """Columns, first rows and (given valid parameters) the plan of the run a project would start."""
    result = Preview()
    try:
        result.columns, result.rows = read_rows(Path(settings["data_path"]))
    except DataError as err:
        result.errors["data_path"] = str(err)
        return result
    if params is None:
        return result
    from tunelab import tasks

    try:
        result.plan = tasks.plan(params)
    except DataError as err:
        result.errors["data_path"] = str(err)
    except ConfigError as err:
        from tunelab.app.params import PROJECT_FIELDS, all_form_fields, field_named

        result.errors[field_named(str(err), [*PROJECT_FIELDS, *all_form_fields()])] = str(err)
    except TunelabError as err:  # the model cannot be found or read, the machine cannot run this, ...
        result.errors["model" if "model" in str(err) else "form"] = str(err)
    return result


def _cut(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + " ..."
