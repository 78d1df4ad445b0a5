"""Compare the shift: per group (and per WiSE-FT alpha), the in-distribution test metric beside every named eval
set (`test/<set>/<metric>`), their mean, the worst set and the drop under shift, paired per replicate; each shift
metric against the best group on it; and effective robustness (Taori et al. 2020): how far a group's shift metric
lies above the least-squares line through the groups' (ID, shift) means, i.e. robustness that ID accuracy does not
already buy."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from src.compare.analysis import Comparison, Group, oriented
from src.compare.runs import MetricName, RunRecord
from src.compare.stats import Estimate, difference, mean_interval

MEAN = "mean over sets"  # the shift metric that averages a run's eval sets; the other shift metrics are the sets


@dataclass(frozen=True)
class Trend:
    """The least-squares line y = slope * x + intercept through (ID, shift) points."""

    slope: float
    intercept: float

    def __call__(self, x: float) -> float:
        return self.slope * x + self.intercept


def fit_trend(points: Sequence[tuple[float, float]]) -> Trend | None:
    """The line through the points; None when fewer than two distinct ID values leave it undetermined."""
    if len({x for x, _ in points}) < 2:
        return None
    slope, intercept = np.polyfit([x for x, _ in points], [y for _, y in points], 1)
    return Trend(float(slope), float(intercept))


@dataclass
class ShiftRow:
    """One group's model (alpha None), or its WiSE-FT interpolation at `alpha`: one point of the robustness plot."""

    group: Group
    alpha: str | None
    values: dict[str | None, Callable[[RunRecord], float | None]]  # None: ID; else a shift metric (set or MEAN)
    estimates: dict[str | None, Estimate | None]
    drop: Estimate | None  # ID minus the mean over sets per replicate, signed so that positive = worse under shift
    worst: str | None  # the eval set with the worst mean
    trend_context: tuple  # the data this row's trend is fitted on: data keys except the training-set size
    effective_robustness: float | None = None  # the mean over sets minus the trend's prediction at this ID mean
    vs_best: dict[str, Estimate] = field(default_factory=dict)  # shift metric -> this row minus the best (oriented)
    best_on: set[str] = field(default_factory=set)  # the shift metrics this row is the best of its data on

    def label(self, keys: Sequence[str] | None = None) -> str:
        return self.group.label(keys) + (f"·α={self.alpha}" if self.alpha is not None else "")

    def within_noise(self, column: str) -> bool | None:
        """Not distinguishable from the best on `column`: the paired (or Welch) interval of Δ contains 0."""
        if column in self.best_on:
            return True
        return self.vs_best[column].contains(0.0) if column in self.vs_best else None


@dataclass
class Shift:
    metric: MetricName  # the compared task metric; ID is `test/<base>`, a set `test/<set>/<base>`
    sets: list[str]
    alphas: list[str]
    rows: list[ShiftRow]
    trend_keys: list[str]  # a trend per value of these: the data keys except the training-set size, which it spans
    trends: dict[tuple, Trend] = field(default_factory=dict)  # per trend context, fitted on the rows without alpha

    @property
    def columns(self) -> list[str]:
        """The shift metrics: each eval set, and their mean when there are several."""
        return [*self.sets, MEAN] if len(self.sets) > 1 else list(self.sets)

    @property
    def summary(self) -> str:
        """The shift metric that effective robustness and the drop are measured on."""
        return self.columns[-1]


def _run_mean(values: list[float | None]) -> float | None:
    """A run's mean over eval sets, only when it has all of them (a partial mean would not be comparable)."""
    return None if any(v is None for v in values) else float(np.mean(values))


def _found(runs: Sequence[RunRecord], metric: MetricName) -> tuple[list[str], list[str]]:
    """The eval sets (in the runs' tag order) and WiSE-FT alphas (ascending) some run logged `metric` for."""
    sets: dict[str, None] = {}
    alphas: set[str] = set()
    for r in runs:
        for name in r.metrics:
            parsed = MetricName.parse(name)
            if parsed.stage == "test" and parsed.base == metric.base and parsed.alpha is not None:
                alphas.add(parsed.alpha)
    for r in runs:
        for s in r.eval_sets:
            if any(metric.test(s, a) in r.metrics for a in (None, *alphas)):
                sets[s] = None
    return list(sets), sorted(alphas, key=float)


def analyse(comparison: Comparison) -> Shift | None:
    """The shift table's rows, noise flags and trends; None when no compared run logged an eval set's metric."""
    metric = MetricName.parse(comparison.selection.metric)
    sets, alphas = _found(comparison.selection.runs, metric)
    if not sets:
        return None
    shift = Shift(metric, sets, alphas, [], [k for k in comparison.data_keys if k != comparison.size_key])
    for g in comparison.groups:
        for alpha in (None, *alphas):
            values = _values(shift, alpha)
            estimates = {c: _estimate(g, value, comparison.confidence) for c, value in values.items()}
            if all(e is None for e in estimates.values()):
                continue
            drop = _estimate(g, _drop(values[None], values[shift.summary], comparison.orient), comparison.confidence)
            known = [s for s in sets if estimates[s] is not None]
            worst = min(known, key=lambda s: comparison.orient(estimates[s].mean)) if known else None
            context = tuple(g.values[k] for k in shift.trend_keys)
            shift.rows.append(ShiftRow(g, alpha, values, estimates, drop, worst, context))
    _trends(shift)
    _against_best(shift, comparison)
    return shift


def _values(shift: Shift, alpha: str | None) -> dict[str | None, Callable[[RunRecord], float | None]]:
    """Per column, how to read a run's value: ID (key None), each set, and with several sets the run's mean."""
    metric = shift.metric
    values: dict[str | None, Callable[[RunRecord], float | None]] = {
        None: lambda r: r.metrics.get(metric.test(None, alpha))
    }
    for s in shift.sets:
        values[s] = lambda r, s=s: r.metrics.get(metric.test(s, alpha))
    if MEAN in shift.columns:
        values[MEAN] = lambda r: _run_mean([r.metrics.get(metric.test(s, alpha)) for s in shift.sets])
    return values


def _drop(
    identity: Callable[[RunRecord], float | None],
    shifted: Callable[[RunRecord], float | None],
    orient: Callable[[float], float],
) -> Callable[[RunRecord], float | None]:
    """A run's ID value minus its shift value, signed so that positive = worse under shift (minimised metrics)."""

    def value(r: RunRecord) -> float | None:
        x, y = identity(r), shifted(r)
        return None if x is None or y is None else orient(x - y)

    return value


def _estimate(group: Group, value: Callable[[RunRecord], float | None], confidence: float) -> Estimate | None:
    known = [v for r in group.runs if (v := value(r)) is not None]
    return mean_interval(known, confidence) if known else None


def _trends(shift: Shift) -> None:
    """Per data context, the summary shift metric against ID through the groups' own models: WiSE-FT points are
    what is measured against the line, not part of it."""
    points: dict[tuple, list[tuple[float, float]]] = {}
    for row in shift.rows:
        x, y = row.estimates[None], row.estimates[shift.summary]
        if row.alpha is None and x is not None and y is not None:
            points.setdefault(row.trend_context, []).append((x.mean, y.mean))
    for context, pts in points.items():
        if (trend := fit_trend(pts)) is not None:
            shift.trends[context] = trend
    for row in shift.rows:
        x, y, trend = row.estimates[None], row.estimates[shift.summary], shift.trends.get(row.trend_context)
        if x is not None and y is not None and trend is not None:
            row.effective_robustness = y.mean - trend(x.mean)


def _against_best(shift: Shift, comparison: Comparison) -> None:
    """On each shift metric, each row against the best row on the same data, paired per replicate as the ID
    comparison is (by seed, and by fold under k-fold)."""
    for column in shift.columns:
        by_context: dict[tuple, list[ShiftRow]] = {}
        for row in shift.rows:
            if row.estimates[column] is not None:
                by_context.setdefault(row.group.context, []).append(row)
        for members in by_context.values():
            best = max(members, key=lambda r: comparison.orient(r.estimates[column].mean))
            best.best_on.add(column)
            for row in members:
                if row is not best:
                    a, b = row.group.replicates(row.values[column]), best.group.replicates(best.values[column])
                    row.vs_best[column] = oriented(difference(a, b, comparison.confidence), comparison)
