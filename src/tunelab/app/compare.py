"""Runs side by side (the compare page and `/api/compare`): their curves overlaid chart by chart, their final
metrics in one table, and only the parameters that differ. Jobs of any project can be compared.
"""

from __future__ import annotations

from typing import Any

from tunelab.app.charts import CHARTS, charts, differing_params, final_values, series
from tunelab.app.results import final_metrics, metric_records, shown_metrics
from tunelab.app.uploads import FieldError

MAX_COMPARED = 8


def parse_job_ids(text: str | list[str]) -> list[int]:
    """Job ids from "1,2,3" (or repeated query values), in the order given, each once."""
    parts = text if isinstance(text, list) else [text]
    ids: list[int] = []
    for piece in ",".join(parts).split(","):
        piece = piece.strip()
        if not piece:
            continue
        if not (piece.isascii() and piece.isdigit() and len(piece) <= 12):
            raise FieldError("jobs", f"{piece!r} is not a job number")
        if int(piece) not in ids:
            ids.append(int(piece))
    if not ids:
        raise FieldError("jobs", "pick at least one job to compare")
    if len(ids) > MAX_COMPARED:
        raise FieldError("jobs", f"compare at most {MAX_COMPARED} jobs at once")
    return ids


def comparison(jobs: list[dict[str, Any]], store: Any = None) -> dict[str, Any]:
    """{"jobs": [...], "charts": [{"id", "title", "series": {"<job>: <key>": points}}], "metrics": [...],
    "params": [...]} for the given jobs (store: to name each job's project)."""
    overlaid: dict[str, dict[str, Any]] = {}
    for job in jobs:
        for chart in charts(series(metric_records(job))):
            into = overlaid.setdefault(chart["id"], {"id": chart["id"], "title": chart["title"], "series": {}})
            for key, points in chart["series"].items():
                into["series"][f"#{job['id']}: {key}"] = points
    shown = []
    for job in jobs:
        project = store.project(job["project_id"]) if store is not None else None
        shown.append(
            {
                "id": job["id"],
                "name": job["name"],
                "status": job["status"],
                "trainer": job["params"].get("trainer"),
                "project": project["name"] if project else None,
            }
        )
    finals = [final_metrics(job) for job in jobs]
    order = [chart_id for chart_id, _, _ in CHARTS]  # the page's order, whichever job had a chart first
    return {
        "jobs": shown,
        "charts": sorted(overlaid.values(), key=lambda chart: order.index(chart["id"])),
        "metrics": final_values(finals),
        "labels": metric_labels(finals),
        "params": differing_params(jobs),
    }


def metric_labels(jobs_metrics: list[dict[str, Any]]) -> dict[str, str]:
    """The readable name of each final metric (the job page's), for the comparison's table."""
    return {key: label for metrics in jobs_metrics for key, label, _ in shown_metrics(metrics)}
