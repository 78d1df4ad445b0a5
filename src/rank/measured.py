"""The runs that measured the candidates: finished `src.run` jobs of the same backbone (every `backbone.*` setting
that changes its features) on the same data (every `data.*` setting that changes the examples), grouped by
strategy, seeds (and folds) as replicates; and how well each score's ranking agrees with theirs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from src.compare.runs import RunRecord, open_store, select
from src.compare.stats import Estimate, mean_interval
from src.data.common import DataModule
from src.rank.cli import Candidate
from src.rank.config import RankSettings
from src.rank.scores import Agreement, agreement
from src.schema import ConfigError
from src.tracking import flatten
from src.tracking.mlflow_run import resolve_uri

# Settings that change how a backbone trains, or how batches are loaded and augmented, but not the frozen features
# or which examples a run has: runs that differ only in these measured the same candidate.
NOT_IDENTITY = {
    *("backbone.lr", "backbone.drop_connect_rate", "backbone.bn_momentum", "backbone.cache_dir"),
    *(f"data.{k}" for k in (*DataModule.NOT_SAMPLES, "hflip", "cache_images")),
}


def identity(params: dict[str, str]) -> dict[str, str]:
    """The params that say which candidate on which data a run (or a rank candidate) is."""
    return {k: v for k, v in params.items() if k.startswith(("backbone.", "data.", "task.")) and k not in NOT_IDENTITY}


@dataclass
class Strategy:
    """The measured runs of one strategy (`finetune` option), per candidate, and the agreement of every score."""

    finetune: str
    runs: dict[str, list[RunRecord]]  # candidate name -> its runs
    values: dict[str, list[float]]  # candidate name -> the measured metric of each run
    estimates: dict[str, Estimate]
    agreement: dict[str, Agreement]  # score -> agreement over the candidates that have the score and runs

    def overlapping(self, name: str) -> list[str]:
        """Candidates whose measured interval overlaps `name`'s: their order is not resolved by the runs."""
        mine = self.estimates[name]
        if not mine.has_interval:
            return []
        return [
            other
            for other, est in self.estimates.items()
            if other != name and est.has_interval and est.low <= mine.high and mine.low <= est.high
        ]

    def seconds(self) -> float:
        return sum(r.seconds or 0.0 for runs in self.runs.values() for r in runs)


@dataclass
class Measured:
    metric: str  # e.g. val/acc (best value of each run) or test/acc
    maximize: bool
    strategies: list[Strategy]


def measured_runs(settings: RankSettings, pool: list[Candidate], launch_dir: Path) -> Measured:
    """Select the finished runs of `settings.measured` (with `settings.filter`), match each to the candidate whose
    identity it has, group them by strategy; raises ConfigError when nothing matches."""
    client = open_store(resolve_uri(settings.uri, launch_dir))
    selection = select(client, settings.measured, where=settings.filter, metric=settings.metric)
    wanted = {c.name: identity(flatten(OmegaConf.to_container(c.raw, resolve=True))) for c in pool}
    grouped: dict[str, dict[str, list[RunRecord]]] = {}
    for run in selection.runs:
        mine = identity(run.params)
        name = next((n for n, want in wanted.items() if want == mine), None)
        if name is not None:
            finetune = run.value("finetune") or "?"
            grouped.setdefault(finetune, {}).setdefault(name, []).append(run)
    if not grouped:
        raise ConfigError(
            f"none of the {len(selection.runs)} finished runs in experiment {settings.measured!r} is one of the "
            "candidates on this data"
        )
    strategies = []
    for finetune, runs in sorted(grouped.items()):
        values = {n: [getattr(r, selection.compared) for r in rs] for n, rs in runs.items()}
        estimates = {n: mean_interval(v, settings.confidence) for n, v in values.items()}
        strategies.append(Strategy(finetune, runs, values, estimates, {}))
    return Measured(selection.metric, selection.maximize, strategies)


def check_agreement(measured: Measured, scores: dict[str, dict[str, float]], settings: RankSettings) -> None:
    """Fill each strategy's agreement per score (`scores`: score -> candidate -> value), over the candidates that
    have both a value of that score and runs; fewer than 3 such candidates rank nothing worth a statistic."""
    for strategy in measured.strategies:
        for name, by_candidate in scores.items():
            common = [c for c in strategy.values if c in by_candidate]
            if len(common) < 3:
                continue
            strategy.agreement[name] = agreement(
                [by_candidate[c] for c in common],
                [strategy.values[c] for c in common],
                measured.maximize,
                settings.resamples,
                settings.confidence,
            )
