"""The report's figures: the metric per group with CIs, learning curves over training-set size, metric against
cost with the Pareto front, an Optuna sweep's best-so-far and expected maximum over k trials, and effective
robustness (shift metric against ID metric)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from src.compare.analysis import Comparison, Group, as_number, contexts  # noqa: E402
from src.compare.shift import Shift, fit_trend  # noqa: E402
from src.compare.stats import Estimate, expected_max  # noqa: E402


def _errorbar(ax: plt.Axes, y: float, est: Estimate, color: str, label: str | None, vertical: bool = False) -> None:
    """A mean with its CI as a bar; a hollow marker when there is no interval (n = 1)."""
    face = color if est.has_interval else "none"
    err = [[est.mean - est.low], [est.high - est.mean]] if est.has_interval else None
    if vertical:
        ax.errorbar(y, est.mean, yerr=err, fmt="o", color=color, mfc=face, capsize=3, label=label)
    else:
        ax.errorbar(est.mean, y, xerr=err, fmt="o", color=color, mfc=face, capsize=3, label=label)


def metric_by_group(comparison: Comparison, path: Path) -> Path:
    groups = comparison.groups
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * len(groups)))
    sel = comparison.selection
    rows = np.arange(len(groups))[::-1]
    for y, g in zip(rows, groups, strict=True):
        for name, est, runs_attr, color, dy in (
            (sel.val_metric, g.val, "val", "tab:blue", 0.12),
            (sel.test_metric, g.test, "test", "tab:orange", -0.12),
        ):
            if est is None:
                continue
            label = name if y == rows[0] else None
            _errorbar(ax, y + dy, est, color, label)
            ax.scatter([getattr(r, runs_attr) for r in g.runs], [y + dy] * len(g.runs), s=8, color=color, alpha=0.4)
    ax.set_yticks(rows, [g.label() + ("  (best)" if g.is_best else "") for g in groups])
    ax.set_xlabel(f"{sel.metric} (mean, {comparison.confidence:.0%} CI; dots: runs; hollow: n = 1)")
    ax.legend(loc="best", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def learning_curve(comparison: Comparison, path: Path) -> Path:
    """Metric against training-set size per series (strategy, backbone, ...), CI bands, log x."""
    size_key = comparison.size_key
    other = [k for k in comparison.data_keys if k != size_key]
    series: dict[str, list[Group]] = {}
    for g in comparison.groups:
        label = g.label([*other, *comparison.series_keys])
        series.setdefault(label, []).append(g)
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (label, members) in enumerate(sorted(series.items())):
        members.sort(key=lambda g: as_number(g.values[size_key]))
        x = np.array([as_number(g.values[size_key]) for g in members])
        mean = np.array([g.metric.mean for g in members])
        color = f"C{i % 10}"
        ax.plot(x, mean, "o-", color=color, label=label)
        low = np.array([g.metric.low if g.metric.has_interval else np.nan for g in members])
        high = np.array([g.metric.high if g.metric.has_interval else np.nan for g in members])
        ax.fill_between(x, low, high, color=color, alpha=0.15)
    ax.set_xscale("log")
    sizes = sorted({as_number(g.values[size_key]) for g in comparison.groups})
    ax.set_xticks(sizes, [f"{x:g}" for x in sizes])
    ax.minorticks_off()
    ax.set_xlabel(size_key)
    ax.set_ylabel(f"{comparison.selection.metric} (mean, {comparison.confidence:.0%} CI band)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def pareto_front(points: list[tuple[float, float]], maximize: bool) -> list[int]:
    """Indices of the points no other point beats on both cost (lower) and metric (better), by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1] if maximize else points[i][1]))
    front, best = [], None
    for i in order:
        value = points[i][1]
        if best is None or (value > best if maximize else value < best):
            front.append(i)
            best = value
    return front


def cost_front(comparison: Comparison, path: Path) -> Path | None:
    """Metric against trainable parameters and against time per epoch; each data context's front is drawn."""
    panels: list[tuple[str, Callable[[Group], float | None]]] = [
        ("trainable parameters", lambda g: g.trainable_params),
        ("seconds per epoch", lambda g: g.seconds_per_epoch),
    ]
    panels = [(name, fn) for name, fn in panels if any(fn(g) for g in comparison.groups)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5), squeeze=False)
    maximize = comparison.selection.maximize
    for ax, (name, fn) in zip(axes[0], panels, strict=True):
        for i, (context, members) in enumerate(contexts(comparison).items()):
            members = [g for g in members if fn(g)]
            color = f"C{i % 10}"
            front = [members[j] for j in pareto_front([(fn(g), g.metric.mean) for g in members], maximize)]
            for g in members:
                _errorbar(ax, fn(g), g.metric, color, None, vertical=True)
                if g in front or len(members) <= 8:  # name every point when few, else the front only
                    ax.annotate(g.label(comparison.series_keys), (fn(g), g.metric.mean), fontsize=7, alpha=0.8)
            label = ", ".join(f"{k}={v}" for k, v in zip(comparison.data_keys, context, strict=True)) or "Pareto front"
            ax.step(
                [fn(g) for g in front], [g.metric.mean for g in front], "--", where="post", color=color, label=label
            )
        ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel(comparison.selection.metric)
        ax.legend(fontsize=7, title="dashed: Pareto front", title_fontsize=7)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def sweep_curves(comparison: Comparison, path: Path) -> Path:
    """Best so far against trial number, and the expected best of k trials with ±1 std (Dodge et al. 2020)."""
    sel = comparison.selection
    compared = sel.compared
    runs = sorted(sel.runs, key=lambda r: (r.trial if r.trial is not None else 1 << 30, r.start_ms))
    values = np.array([getattr(r, compared) for r in runs])
    best = np.maximum.accumulate(values) if sel.maximize else np.minimum.accumulate(values)
    mean, std = expected_max(values, sel.maximize)
    k = np.arange(1, len(values) + 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.plot(k, values, "o", alpha=0.4, label="trial")
    left.step(k, best, where="post", label="best so far")
    left.set_xlabel("completed trials (in trial order)")
    right.plot(k, mean, label="expected best of k")
    right.fill_between(k, mean - std, mean + std, alpha=0.2, label="±1 std")
    right.set_xlabel("k trials (random draws from the completed ones)")
    for ax in (left, right):
        ax.set_ylabel(sel.metric)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _half_widths(est: Estimate) -> list[list[float]] | None:
    return [[est.mean - est.low], [est.high - est.mean]] if est.has_interval else None


def effective_robustness(comparison: Comparison, shift: Shift, path: Path) -> Path:
    """Per shift metric (the mean over sets, then each set), the metric against ID: a point per group with CIs on
    both axes (a colour per group), its WiSE-FT alphas as a curve of hollow points in its colour, the least-squares
    trend through the groups of each data set (black, dashed), and y = x (no drop) for reference."""
    columns = list(dict.fromkeys([shift.summary, *shift.sets]))  # the summary (mean over sets) first
    colors = {id(g): f"C{i % 10}" for i, g in enumerate(comparison.groups)}
    styles = {c: ("--", "-.", ":")[i % 3] for i, c in enumerate(dict.fromkeys(r.trend_context for r in shift.rows))}
    ncols = min(len(columns), 4)  # wrapped: six eval sets side by side are too narrow to read
    nrows = -(-len(columns) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 5.5 * nrows), squeeze=False)
    for ax in axes.flat[len(columns) :]:
        ax.set_visible(False)
    for ax, column in zip(axes.flat, columns, strict=False):
        points = [(r, r.estimates[None], r.estimates[column]) for r in shift.rows]
        points = [(r, x, y) for r, x, y in points if x is not None and y is not None]
        curves: dict[int, list[tuple[float, float]]] = {}  # per group: its alphas, ascending
        for row, x, y in points:
            color = colors[id(row.group)]
            plain = row.alpha is None
            err = {"xerr": _half_widths(x), "yerr": _half_widths(y)}
            label = row.label(comparison.series_keys) if plain else None
            ax.errorbar(x.mean, y.mean, **err, fmt="o", color=color, mfc=color if plain else "white", capsize=3,
                        alpha=0.9 if plain else 0.6, label=label)  # fmt: skip
            if not plain:
                curves.setdefault(id(row.group), []).append((x.mean, y.mean))
                ax.annotate(f"α={row.alpha}", (x.mean, y.mean), fontsize=7, xytext=(4, 4), textcoords="offset points")
        for group_id, curve in curves.items():
            ax.plot(*zip(*curve, strict=True), "-", color=colors[group_id], alpha=0.8)
        for context, style in styles.items():
            own = [(x.mean, y.mean) for r, x, y in points if r.trend_context == context and r.alpha is None]
            if (trend := fit_trend(own)) is not None:
                xs = [min(x for x, _ in own), max(x for x, _ in own)]
                where = f" ({', '.join(map(str, context))})" if context else ""
                label = f"trend{where}: y = {trend.slope:.2f} x {trend.intercept:+.3f}"
                ax.plot(xs, [trend(x) for x in xs], style, color="black", label=label)
        lims = [min(ax.get_xlim()[0], ax.get_ylim()[0]), max(ax.get_xlim()[1], ax.get_ylim()[1])]
        ax.plot(lims, lims, ":", color="gray", lw=1, label="y = x (no drop)")
        ax.set_xlabel(f"ID {shift.metric.test()} (mean, {comparison.confidence:.0%} CI)")
        ax.set_ylabel(f"{column}: {shift.metric.test(column if column in shift.sets else '<set>')}")
        ax.set_title(column, fontsize=9)
        ax.legend(fontsize=7, loc="upper left", title="hollow: WiSE-FT α", title_fontsize=7)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
