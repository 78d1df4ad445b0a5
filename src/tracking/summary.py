"""What the terminal says when work ends: which run (or parent), the result, where the artifacts are, and the
command and URL that open it in the MLflow UI; and the summary table a parent run keeps of its children."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from mlflow.entities import Run
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME, MLFLOW_RUN_NOTE

UI_PORT = 5000
NOTE_LIMIT = 8000  # MLflow's longest tag value (MAX_TAG_VAL_LENGTH); a longer note would fail the whole summary
EVAL_SETS_TAG = "eval_sets"  # a run's named evaluation sets, comma-separated (metrics test/<name>/<metric>)


def eval_sets(tags: Mapping[str, str]) -> list[str]:
    """The named evaluation sets a run tested on (its `eval_sets` tag), in the run's order."""
    return [s for s in tags.get(EVAL_SETS_TAG, "").split(",") if s]


def best_metric(metric: str) -> str:
    """The metric every run logs at its end: the best validation value of its objective over the run."""
    return f"best/{metric}"


def test_metric(metric: str) -> str:
    """The test counterpart of a validation objective (`val/spearman` -> `test/spearman`), shown beside it."""
    return "test/" + metric.removeprefix("val/")


def where(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """The command that starts the UI on this store and the URL of the runs view (or of one run). Both URLs carry
    `workflowType=machine_learning`: without it MLflow 3 opens its GenAI layout, where a training run's metrics
    and charts are not where users look for them."""
    local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
    base = f"http://127.0.0.1:{UI_PORT}" if local else uri.rstrip("/")
    page = f"/runs/{run_id}" if run_id else ""
    command = f"mlflow ui --backend-store-uri {uri} --port {UI_PORT}, then open " if local else "open "
    return f"{command}{base}/#/experiments/{experiment_id}{page}?workflowType=machine_learning"


def run_summary(run: Run, metric: str, uri: str) -> str:
    """A finished run in three lines."""
    m = run.data.metrics
    results = " · ".join(f"{k} {m[k]:.4f}" for k in (best_metric(metric), test_metric(metric)) if k in m)
    name = run.data.tags.get(MLFLOW_RUN_NAME, run.info.run_name)
    view = where(uri, run.info.experiment_id, run.info.run_id)
    head = f"Run {name} ({run.info.run_id}) {run.info.status}: {results}"
    sets = eval_sets(run.data.tags)
    if sets:
        suffix = test_metric(metric).removeprefix("test/")
        head += f"\n  eval sets ({suffix}): " + " · ".join(
            f"{s} {m[key]:.4f}" for s in sets if (key := f"test/{s}/{suffix}") in m
        )
    return f"{head}\n  artifacts: {run.info.artifact_uri}\n  view: {view}"


def _rank(runs: list[Run], metric: str, direction: str) -> list[Run]:
    def key(run: Run) -> float:
        value = run.data.metrics.get(best_metric(metric), math.nan)
        if math.isnan(value):
            return math.inf
        return -value if direction == "maximize" else value

    return sorted(runs, key=key)


def _note(table: str, n: int, metric: str) -> str:
    """The parent's description: a heading and the table, cut to the best rows that fit MLflow's tag limit (a
    large sweep's table would not), saying where the rest is."""
    head = f"{n} runs, best {best_metric(metric)} first (full table: summary.md)\n\n"
    lines = table.splitlines()
    while len(head) + len("\n".join(lines)) > NOTE_LIMIT:
        lines.pop()
    return head + "\n".join(lines)


def _over_folds(finished: list[Run], metric: str) -> tuple[dict[str, float], str] | None:
    """A k-fold grid (children that differ only in `cv.fold`, and maybe `seed`): the mean and t-interval of the
    best validation (and test) value over its children, logged as `cv/mean/...` and `cv/ci_low|ci_high/...`."""
    if len(finished) < 2 or any(r.data.params.get("cv.folds") in (None, "None") for r in finished):
        return None
    keys = set().union(*(r.data.params for r in finished))
    if {k for k in keys if len({r.data.params.get(k) for r in finished}) > 1} - {"cv.fold", "seed"}:
        return None
    from src.compare.stats import mean_interval

    metrics, parts = {}, []
    for key in (best_metric(metric), test_metric(metric)):
        values = [r.data.metrics[key] for r in finished if key in r.data.metrics]
        if len(values) == len(finished):
            est = mean_interval(values)
            metrics |= {f"cv/mean/{key}": est.mean, f"cv/ci_low/{key}": est.low, f"cv/ci_high/{key}": est.high}
            parts.append(f"{key} {est.mean:.4f} [{est.low:.4f}, {est.high:.4f}]")
    line = f"  over {len(finished)} folds (mean, 95 % t-interval): " + " · ".join(parts)
    return (metrics, line) if parts else None


def summarize_children(parent: Any, metric: str, direction: str) -> int:
    """Log the children's table (summary.md, summary.csv) and best child on the parent `MLflowRun`, print the
    summary; returns how many children did not finish. The table is also the parent's description (the MLflow
    UI renders the note as Markdown), so the parent's page shows it instead of "No description"."""
    client = parent.client
    children = client.search_runs([parent.experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.run_id}'")
    ranked = _rank(children, metric, direction)
    columns = ["run", "status", best_metric(metric), test_metric(metric), "run_id"]
    rows = [
        [
            r.info.run_name,
            r.info.status,
            *(f"{r.data.metrics[k]:.4f}" if k in r.data.metrics else "" for k in columns[2:4]),
            r.info.run_id,
        ]
        for r in ranked
    ]
    table = "\n".join(
        ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns), *("| " + " | ".join(r) + " |" for r in rows)]
    )
    parent.log_text(table + "\n", "summary.md")
    parent.log_text("\n".join(",".join(r) for r in [columns, *rows]) + "\n", "summary.csv")
    parent.set_tags({MLFLOW_RUN_NOTE: _note(table, len(children), metric)})
    finished = [r for r in ranked if r.info.status == "FINISHED" and best_metric(metric) in r.data.metrics]
    failed = sum(r.info.status != "FINISHED" for r in children)
    lines = [f"{len(children)} runs ({len(children) - failed} FINISHED, {failed} not) under parent run {parent.run_id}"]
    if finished:
        best = finished[0]
        value = best.data.metrics[best_metric(metric)]
        parent.set_tags({"best_run_id": best.info.run_id, "best_run_name": best.info.run_name})
        parent.log_metrics({best_metric(metric): value})
        lines.append(f"  best: {best.info.run_name} {metric} {value:.4f} (run {best.info.run_id})")
    if over := _over_folds(finished, metric):
        parent.log_metrics(over[0])
        lines.append(over[1])
    lines.append(
        f"  table: summary.md in the parent run's artifacts ({client.get_run(parent.run_id).info.artifact_uri})"
    )
    lines.append(f"  view: {where(parent.uri, parent.experiment_id)}")
    print("\n".join(lines), flush=True)
    return failed
