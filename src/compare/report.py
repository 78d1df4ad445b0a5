"""The report: a Markdown and a CSV table, the regime map and recommendations in words, the plots; written to a
folder and logged to MLflow as its own run (tag `report=compare`) so it sits beside the runs it compares."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path

from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from src.compare import plots
from src.compare.analysis import Comparison, Group, Recommendation, as_number, contexts, recommend_at
from src.compare.runs import REPORT_TAG, RunRecord
from src.compare.shift import Shift, ShiftRow
from src.compare.stats import Estimate, difference
from src.sweep.trial import ROLE_TAG


def fmt(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}g}" if abs(x) >= 1000 else f"{x:.{digits}f}".rstrip("0").rstrip(".") or "0"


def fmt_mean(est: Estimate | None) -> str:
    if est is None:
        return "–"
    return f"{fmt(est.mean)} ± {fmt(est.std)}" if est.std is not None else f"{fmt(est.mean)}"


def fmt_ci(est: Estimate | None) -> str:
    if est is None:
        return "–"
    return f"[{fmt(est.low)}, {fmt(est.high)}]" if est.has_interval else f"n = {est.n}, no interval"


def fmt_diff(est: Estimate | None) -> str:
    if est is None:
        return "–"
    how = "" if est.paired is None or not est.has_interval else (" paired" if est.paired else " Welch")
    return f"{est.mean:+.4f} {fmt_ci(est)}{how}"


def flag(value: bool | None, yes: str, no: str = "") -> str:
    return "?" if value is None else (yes if value else no)


def ci_header(comparison: Comparison) -> str:
    return "95 % CI" if comparison.confidence == 0.95 else f"{comparison.confidence:.0%} CI"


def table_rows(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    sel = comparison.selection
    header = [*comparison.keys, "n"]
    if sel.val_metric:  # an eval-set metric (test/rotate/acc) has no validation counterpart
        header += [f"{sel.val_metric} mean ± std", ci_header(comparison)]
    if sel.test_metric:
        header += [f"{sel.test_metric} mean ± std", "CI"]
    header += ["Δ vs best [CI]", "within noise", "gain vs scratch [CI]", "negative transfer"]
    header += ["trainable params", "s / epoch", "total s"]
    rows = []
    for g in comparison.groups:
        row = [str(g.values[k]) for k in comparison.keys]
        row += [str(len(g.runs))]
        if sel.val_metric:
            row += [fmt_mean(g.val), fmt_ci(g.val)]
        if sel.test_metric:
            row += [fmt_mean(g.test), fmt_ci(g.test)]
        row += [
            "best" if g.is_best else fmt_diff(g.vs_best),
            flag(g.within_noise, "yes", "no"),
            "baseline" if g.is_scratch else fmt_diff(g.gain),
            flag(g.negative_transfer, "NEGATIVE", "no") if g.gain else "",
            fmt(g.trainable_params, 6),
            fmt(g.seconds_per_epoch, 3),
            fmt(g.seconds, 3),
        ]
        rows.append(row)
    return header, rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def estimate_fields(prefix: str, e: Estimate | None) -> dict[str, object]:
    e = e or Estimate(0, math.nan, None)
    return {f"{prefix}_mean": e.mean, f"{prefix}_std": e.std, f"{prefix}_low": e.low, f"{prefix}_high": e.high}


def csv_table(records: list[dict[str, object]]) -> str:
    """Records with the same keys as CSV; None and NaN are empty cells (not available)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(records[0].keys())
    for record in records:
        writer.writerow(["" if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in record.values()])
    return out.getvalue()


def csv_text(comparison: Comparison) -> str:
    """One row per group with raw numbers (empty = not available), for spreadsheets and scripts."""
    records = []
    for g in comparison.groups:
        records.append(
            {
                **g.values,
                "n": len(g.runs),
                "seeds": " ".join(str(r.seed) for r in g.runs),
                **estimate_fields("val", g.val),
                **estimate_fields("test", g.test),
                "best": g.is_best,
                **estimate_fields("vs_best", g.vs_best),
                "paired": g.vs_best.paired if g.vs_best else None,
                "within_noise": g.within_noise,
                "baseline": g.baseline.label() if g.baseline else None,
                **estimate_fields("gain", g.gain),
                "negative_transfer": g.negative_transfer,
                "trainable_params": g.trainable_params,
                "seconds_per_epoch": g.seconds_per_epoch,
                "seconds": g.seconds,
                "run_ids": " ".join(r.run_id for r in g.runs),
            }
        )
    return csv_table(records)


def shift_lines(comparison: Comparison, shift: Shift) -> list[str]:
    """The shift table (ID, each eval set, their mean, worst set, drop, effective robustness) and each shift
    metric against the best group on it."""
    keys = comparison.keys
    sign = "ID − shift" if comparison.selection.maximize else "shift − ID"
    alpha = ["α"] if shift.alphas else []
    header = [*keys, *alpha, "n", f"ID {shift.metric.test()} [CI]", *(f"{c} [CI]" for c in shift.columns)]
    header += ["worst set", f"drop: {sign} [CI]", "effective robustness"]
    rows, flags = [], []
    for row in shift.rows:
        label = [str(row.group.values[k]) for k in keys] + ([row.alpha or "–"] if shift.alphas else [])
        rows.append(
            [
                *label,
                str(len(row.group.runs)),
                *(
                    f"{fmt(e.mean)} {fmt_ci(e)}" if e else "–"
                    for e in (row.estimates[c] for c in [None, *shift.columns])
                ),
                row.worst or "–",
                f"{fmt(row.drop.mean)} {fmt_ci(row.drop)}" if row.drop else "–",
                f"{row.effective_robustness:+.4f}" if row.effective_robustness is not None else "–",
            ]
        )
        flags.append([*label, *(against_best(row, c) for c in shift.columns)])
    where = f" per {', '.join(shift.trend_keys)}" if shift.trends and shift.trend_keys else ""
    return [
        "## Under distribution shift",
        "",
        f"ID = `{shift.metric.test()}` (in-distribution test); eval sets: {', '.join(shift.sets)} "
        f"(`{shift.metric.test('<set>')}`)"
        + (f"; WiSE-FT α: {', '.join(shift.alphas)} (one row each)" if shift.alphas else "")
        + f". Drop = {sign} per replicate (paired), positive = worse under shift. Effective robustness = "
        f"{shift.summary} minus the least-squares line through the groups' (ID, {shift.summary}) means{where} "
        "(WiSE-FT rows are measured against it, not fitted); positive = more robust than its ID metric predicts.",
        "",
        markdown_table(header, rows),
        "",
        "Against the best on each shift metric (Δ [CI], paired by seed and fold when both ran the same ones):",
        "",
        markdown_table([*keys, *alpha, *shift.columns], flags),
        "",
    ]


def against_best(row: ShiftRow, column: str) -> str:
    if column in row.best_on:
        return "best"
    if column not in row.vs_best:
        return "–"
    return f"{fmt_diff(row.vs_best[column])}, {flag(row.within_noise(column), 'within noise', 'beyond noise')}"


def shift_csv(shift: Shift) -> str:
    """One row per group (and WiSE-FT alpha) with raw numbers: shift.csv."""
    records = []
    for row in shift.rows:
        record: dict[str, object] = {**row.group.values, "alpha": row.alpha, "n": len(row.group.runs)}
        record |= estimate_fields("id", row.estimates[None])
        for c in shift.columns:
            record |= estimate_fields(c, row.estimates[c])
            record |= estimate_fields(f"{c} vs_best", row.vs_best.get(c))
            record[f"{c} within_noise"] = row.within_noise(c)
        record |= estimate_fields("drop", row.drop)
        record |= {"worst_set": row.worst, "effective_robustness": row.effective_robustness}
        records.append(record)
    return csv_table(records)


def regime_lines(comparison: Comparison) -> list[str]:
    """Per measured size: the best group, those within noise of it, and the cheapest of those."""
    series = comparison.series_keys
    header = [*comparison.data_keys, "best", "within noise of the best", "cheapest of those"]
    rows = []
    for members in contexts(comparison).values():
        best, keep = recommend_at(comparison, members)
        rows.append(
            [
                *(str(best.values[k]) for k in comparison.data_keys),
                f"{best.label(series)} ({fmt(best.metric.mean)})",
                "; ".join(g.label(series) for g in keep),
                keep[0].label(series),
            ]
        )
    lines = ["## Regime map", "", markdown_table(header, rows), ""]
    crossover = crossover_line(comparison)
    if crossover:
        lines += [crossover, ""]
    return lines


def crossover_line(comparison: Comparison, probe: str = "linear_probe", tuned: str = "full") -> str | None:
    """Where full fine-tuning overtakes the linear probe (first size with a higher mean, and whether beyond noise)."""
    if comparison.size_key is None or "finetune" not in comparison.keys:
        return None
    at: dict[float, dict[str, Group]] = {}
    for g in comparison.groups:
        at.setdefault(as_number(g.values[comparison.size_key]), {})[g.values["finetune"]] = g
    pairs = [(s, by[probe], by[tuned]) for s, by in sorted(at.items()) if probe in by and tuned in by]
    if not pairs:
        return None
    compared = comparison.selection.compared
    ahead = []
    for size, p, t in pairs:
        gap = difference(t.by_seed(compared), p.by_seed(compared), comparison.confidence)
        if comparison.orient(gap.mean) > 0:
            ahead.append((size, p, t, gap))
    if not ahead:
        return f"Crossover: `{tuned}` never overtakes `{probe}` at the measured sizes ({comparison.size_key})."
    size, p, t, _ = ahead[0]
    beyond = [s for s, _, _, gap in ahead if gap.contains(0.0) is False]
    noise = f"; beyond noise from {fmt(beyond[0])}" if beyond else "; within noise at every size"
    return (
        f"Crossover: `{tuned}` overtakes `{probe}` from {comparison.size_key} = {fmt(size)} "
        f"({fmt(t.metric.mean)} vs {fmt(p.metric.mean)}){noise}."
    )


def recommendation_lines(comparison: Comparison, rec: Recommendation) -> list[str]:
    series = comparison.series_keys
    lines = [
        f"## Recommendation for {comparison.size_key} = {fmt(rec.requested)}",
        "",
        f"Nearest measured size: {fmt(rec.size)}. Not significantly worse than the best "
        f"({rec.best.label(series)}, {fmt(rec.best.metric.mean)}), cheapest first:",
        "",
    ]
    for i, g in enumerate(rec.candidates, 1):
        lines.append(
            f"{i}. {g.label(series)}: {comparison.selection.metric} {fmt_mean(g.metric)} {fmt_ci(g.metric)}, "
            f"{fmt(g.trainable_params, 6)} trainable params, {fmt(g.seconds, 3)} s"
        )
    return [*lines, ""]


def time_line(runs: Sequence[RunRecord]) -> str:
    """Total run time and the wall span from the first start to the last end (a sweep's duration when serial)."""
    timed = [r for r in runs if r.seconds is not None]
    if not timed:
        return ""
    total = sum(r.seconds for r in timed)
    span = (max(r.start_ms + 1000 * r.seconds for r in timed) - min(r.start_ms for r in timed)) / 1000
    return f"Run time: {total / 60:.1f} min in all; first start to last end: {span / 60:.1f} min."


def is_sweep(comparison: Comparison) -> bool:
    runs = comparison.selection.runs
    return len(runs) >= 2 and all(r.tags.get(ROLE_TAG) == "trial" for r in runs)


def build(
    comparison: Comparison, out: Path, title: str, rec: Recommendation | None = None, shift: Shift | None = None
) -> list[Path]:
    """Write report.md, groups.csv (and shift.csv) and the PNGs into `out`; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    sel = comparison.selection
    header, rows = table_rows(comparison)
    excluded = ", ".join(f"{n} {why}" for why, n in sorted(sel.excluded.items())) or "none"
    direction = "higher" if sel.maximize else "lower"
    replicates = "seeds and cv folds" if any(r.value("cv.folds") for r in sel.runs) else "seeds"
    lines = [
        f"# {title}",
        "",
        f"{len(sel.runs)} runs in {len(comparison.groups)} groups by {', '.join(comparison.keys) or '(none)'}; "
        f"{replicates} are replicates. Compared: `{sel.metric}` ({direction} is better; val = the best validation "
        f"value of each run, test = its best checkpoint). Intervals: {comparison.confidence:.0%} Student t; "
        "Δ vs best is paired by seed (and fold) when both groups ran the same ones, else Welch; "
        "within noise = the interval of Δ contains 0.",
        "",
        f"Excluded runs: {excluded}. {time_line(sel.runs)}",
        "",
        markdown_table(header, rows),
        "",
        *comparison.notes,
        "",
    ]
    files = [plots.metric_by_group(comparison, out / "metric_by_group.png")]
    if shift is not None:
        lines += shift_lines(comparison, shift)
        files.append(plots.effective_robustness(comparison, shift, out / "effective_robustness.png"))
        (out / "shift.csv").write_text(shift_csv(shift), encoding="utf-8")
    if comparison.size_key:
        lines += regime_lines(comparison)
        files.append(plots.learning_curve(comparison, out / "learning_curve.png"))
    if rec is not None:
        lines += recommendation_lines(comparison, rec)
    cost = plots.cost_front(comparison, out / "pareto.png")
    files += [cost] if cost else []
    if is_sweep(comparison):
        files.append(plots.sweep_curves(comparison, out / "sweep_expected_max.png"))
        lines += [
            "## Sweep",
            "",
            "Best so far against trials, and the expected best of k trials (Dodge et al. 2020) in "
            "`sweep_expected_max.png`: how many trials this search space needs.",
            "",
        ]
    lines += [f"![{f.stem}]({f.name})" for f in files] + [""]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")
    (out / "groups.csv").write_text(csv_text(comparison), encoding="utf-8")
    tables = [out / "report.md", out / "groups.csv", *([out / "shift.csv"] if shift is not None else [])]
    return [*tables, *files]


def log_run(client: MlflowClient, comparison: Comparison, out: Path, name: str, settings: dict[str, str]) -> str:
    """The report as its own MLflow run in the compared experiment (nested under the sweep's parent if one was
    chosen), tagged `report=compare`; `python -m src.compare` never compares such runs."""
    sel = comparison.selection
    tags = {REPORT_TAG: "compare", "compare.metric": sel.metric, "compare.runs": str(len(sel.runs))}
    if sel.parent is not None:
        tags[MLFLOW_PARENT_RUN_ID] = sel.parent.info.run_id
    run = client.create_run(sel.experiment_id, run_name=name, tags=tags)
    run_id = run.info.run_id
    try:
        for key, value in settings.items():
            client.log_param(run_id, f"compare.{key}", value)
        client.log_artifacts(run_id, str(out))
    except BaseException:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
    return run_id
