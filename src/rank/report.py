"""The ranking's report: the score table and bar plot, and for each strategy with measured runs, the measured
means with their intervals (overlapping ones marked as not resolved), each score's weighted Kendall tau and
Spearman rho with bootstrap intervals, and the time of the ranking against the time of the runs."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from src.compare.report import fmt, fmt_ci, markdown_table  # noqa: E402
from src.rank.config import RankSettings  # noqa: E402
from src.rank.measured import Measured, check_agreement  # noqa: E402

if TYPE_CHECKING:
    from src.rank.run import Scored


def by_score(results: list[Scored], names: list[str]) -> dict[str, dict[str, float]]:
    """score -> candidate -> value, for the scores some candidate has."""
    out: dict[str, dict[str, float]] = {}
    for name in names:
        values = {r.candidate.name: r.scores[name] for r in results if name in r.scores}
        if values:
            out[name] = values
    return out


def score_table(results: list[Scored], names: list[str]) -> tuple[list[str], list[list[str]]]:
    """One row per candidate, best first by the first score; each score with its rank among the candidates."""
    scores = by_score(results, names)
    ranks = {
        name: {c: i + 1 for i, c in enumerate(sorted(values, key=values.get, reverse=True))}
        for name, values in scores.items()
    }
    first = next(iter(scores))
    ordered = sorted(results, key=lambda r: -r.scores.get(first, float("-inf")))
    header = ["candidate", *scores, "feature dim", "examples", "seconds", "features"]
    rows = [
        [
            r.candidate.name,
            *(
                f"{r.scores[s]:.4g} ({ranks[s][r.candidate.name]})" if s in r.scores else "n/a (no source head)"
                for s in scores
            ),
            str(r.feature_dim),
            str(r.examples),
            f"{r.seconds:.1f}",
            "cache hit" if r.cache_hit else f"encoded in {r.seconds_features:.1f} s",
        ]
        for r in ordered
    ]
    return header, rows


def bar_plot(results: list[Scored], names: list[str], path: Path) -> Path:
    """One panel per score, candidates in the same order (best first by the first score)."""
    scores = by_score(results, names)
    first = next(iter(scores))
    order = sorted((r.candidate.name for r in results), key=lambda c: -scores[first].get(c, float("-inf")))
    fig, axes = plt.subplots(1, len(scores), figsize=(3.2 * len(scores), 0.35 * len(order) + 1.5), squeeze=False)
    for ax, (name, values) in zip(axes[0], scores.items(), strict=True):
        rows = [i for i, c in enumerate(order) if c in values]  # a candidate without this score: an empty row
        ax.barh(rows, [values[order[i]] for i in rows], color="tab:blue")
        ax.set_yticks(range(len(order)), order if ax is axes[0][0] else [""] * len(order))
        ax.set_ylim(len(order) - 0.5, -0.5)
        ax.set_title(name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def measured_lines(measured: Measured, seconds: float, confidence: float) -> list[str]:
    lines = []
    for strategy in measured.strategies:
        n_runs = sum(len(v) for v in strategy.values.values())
        lines += [
            f"## Measured: finetune={strategy.finetune} ({measured.metric}, {n_runs} runs)",
            "",
            f"Mean over each candidate's runs (seeds as replicates) with its {confidence:.0%} t-interval; "
            "candidates whose intervals overlap are not ordered by the runs (ranking between them is not resolvable; "
            "? = one run, no interval).",
            "",
        ]
        order = sorted(strategy.estimates, key=lambda c: strategy.estimates[c].mean, reverse=measured.maximize)
        rows = [
            [
                c,
                str(e.n),
                fmt(e.mean),
                fmt_ci(e),
                ", ".join(strategy.overlapping(c)) or ("-" if e.has_interval else "?"),
            ]
            for c, e in ((c, strategy.estimates[c]) for c in order)
        ]
        lines += [markdown_table(["candidate", "n", "mean", "interval", "overlaps (unresolved)"], rows), ""]
        if strategy.agreement:
            rows = [
                [
                    s,
                    fmt(a.tau, 3),
                    f"[{fmt(a.tau_low, 3)}, {fmt(a.tau_high, 3)}]",
                    fmt(a.rho, 3),
                    f"[{fmt(a.rho_low, 3)}, {fmt(a.rho_high, 3)}]",
                ]  # fmt: skip
                for s, a in sorted(strategy.agreement.items(), key=lambda kv: -kv[1].tau)
            ]
            header = [
                "score",
                "weighted tau",
                f"{confidence:.0%} bootstrap",
                "Spearman rho",
                f"{confidence:.0%} bootstrap",
            ]
            lines += [markdown_table(header, rows), ""]
        else:
            lines += ["Fewer than 3 candidates have both scores and runs: no rank correlation.", ""]
        runs_s = strategy.seconds()
        share = f" = {100 * seconds / runs_s:.1f} % of it" if runs_s else ""
        lines += [f"Time: ranking {seconds:.1f} s; the {n_runs} runs it predicts {runs_s:.1f} s{share}.", ""]
    return lines


def grid_commands(results: list[Scored]) -> list[str]:
    """How to measure the candidates (3 seeds each, linear probe; any strategy works), so the report says it."""
    return [
        "python -m src.run -m " + " ".join(f"'{o}'" if "[" in o else o for o in r.candidate.overrides)
        + " finetune=linear_probe seed=0,1,2"
        for r in results
    ]  # fmt: skip


def write(
    out: Path,
    title: str,
    results: list[Scored],
    names: list[str],
    skipped: dict[str, str],
    measured: Measured | None,
    seconds: float,
    settings: RankSettings,
) -> list[Path]:
    """report.md, scores.csv and scores.png in `out` (and the agreement filled into `measured`)."""
    out.mkdir(parents=True, exist_ok=True)
    encoding = sum(r.seconds_features for r in results)
    lines = [
        f"# Ranking: {title}",
        "",
        f"{len(results)} candidates scored from their frozen training-split features in {seconds:.1f} s "
        f"({encoding:.1f} s of it encoding features the cache did not have). Every score: higher is better; "
        "(k) = rank among the candidates.",
        "",
    ]
    lines += [f"- skipped {name}: {why}" for name, why in skipped.items()]
    lines += ["", markdown_table(*score_table(results, names)), "", "![scores](scores.png)", ""]
    if measured is not None:
        check_agreement(measured, by_score(results, names), settings)
        lines += measured_lines(measured, seconds, settings.confidence)
    else:
        lines += ["No measured runs of these candidates yet; measure them with, e.g.:", "", "```bash"]
        lines += [*grid_commands(results), "```", ""]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        ["candidate", "run_id", "overrides", *names, "feature_dim", "examples", "seconds", "seconds_features"]
    )
    for r in results:
        row = [r.candidate.name, r.run_id, " ".join(r.candidate.overrides), *(r.scores.get(s, "") for s in names)]
        writer.writerow([*row, r.feature_dim, r.examples, round(r.seconds, 3), round(r.seconds_features, 3)])
    (out / "scores.csv").write_text(buffer.getvalue(), encoding="utf-8")
    return [out / "report.md", out / "scores.csv", bar_plot(results, names, out / "scores.png")]


def parent_metrics(results: list[Scored], measured: Measured | None, seconds: float) -> dict:
    """The parent run's metrics: the ranking's time, and per strategy each score's tau and rho with intervals."""
    metrics = {"rank/seconds": seconds, "rank/candidates": float(len(results))}
    for strategy in measured.strategies if measured is not None else []:
        if strategy.seconds():
            metrics[f"agreement/{strategy.finetune}/time_share"] = seconds / strategy.seconds()
        for score, a in strategy.agreement.items():
            prefix = f"agreement/{strategy.finetune}/{score}"
            metrics |= {f"{prefix}/tau": a.tau, f"{prefix}/tau_low": a.tau_low, f"{prefix}/tau_high": a.tau_high}
            metrics[f"{prefix}/rho"] = a.rho
    return metrics
