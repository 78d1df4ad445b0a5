"""The compute behind `python -m src.rank`: each candidate's training-split features from the frozen-feature
cache (the same entry a `linear_probe` run of that candidate reads or writes), its scores, its MLflow run; then
the ranking, and its agreement with the measured runs, in the parent run and a report folder."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import Subset

from src.backbones import BACKBONES
from src.cache import CacheStats
from src.config import TrackingConfig
from src.data import DATA
from src.data.common import DataModule
from src.errors import one_line
from src.features import NAMESPACE, FeatureCache, prefix_what
from src.rank import report
from src.rank.cli import Candidate
from src.rank.config import SCORES, RankSettings, score_schema
from src.rank.measured import Measured, measured_runs
from src.rank.scores import Features
from src.schema import ConfigError
from src.tasks import TASKS
from src.tracking import MLflowRun, flatten
from src.tracking.mlflow_run import source_tags
from src.tracking.multirun import RANK_ROLE, ROLE_TAG

log = logging.getLogger(__name__)


@dataclass
class Scored:
    """One candidate's outcome: its scores (a score that does not apply to it is absent), cost and run."""

    candidate: Candidate
    run_id: str
    scores: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0  # build + features + scores
    seconds_features: float = 0.0  # of which encoding (0 when the cache had the entry)
    cache_hit: bool = False
    feature_dim: int = 0
    examples: int = 0


def subsample(datamodule: DataModule, examples: int | None, seed: int) -> list[int] | None:
    """Replace the training split by a seeded random subset of `examples` (None, or more than it has: all); the
    indices kept, which then go into the cache key."""
    train = datamodule.splits["train"]
    if examples is None or examples >= len(train):
        return None
    keep = sorted(torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:examples].tolist())
    subset = Subset(train, keep)
    subset.labels = np.asarray(train.labels)[keep]  # what the data's identity (and so the cache key) reads
    datamodule.splits["train"] = subset
    return keep


def features_of(candidate: Candidate, examples: int | None) -> tuple[Features, bool, float, int]:
    """The candidate's pooled features of the training split (or `examples` of it) through the feature cache (the
    `linear_probe` cut: the whole split shares a probe run's entry), its task's soft targets, and the source head's
    predictions when the backbone has one; plus whether the cache had them, the seconds spent encoding, and the
    feature dimension."""
    cfg, raw = candidate.cfg, candidate.raw
    torch.manual_seed(cfg.seed)  # as a run seeds before building: a random-init part is the same in both
    backbone = BACKBONES.build(raw.backbone, pretrained=True)
    task = TASKS.build(raw.task)
    datamodule = DATA.build(raw.data, preprocessing=backbone.preprocessing, seed=cfg.seed, task=task, cv=cfg.cv)
    datamodule.setup("fit")
    if datamodule.train_augmented:
        raise ConfigError(
            "data: the training split is augmented (e.g. data.hflip=true), and ranking reads it once, as it is; "
            "set the augmentation off for ranking (data.hflip=false)"
        )
    keep = subsample(datamodule, examples, cfg.seed)
    cache = FeatureCache(cfg.cache, datamodule, cfg.trainer.get("accelerator"))
    n = len(backbone.layer_groups())
    what = prefix_what(n, n)  # the key a linear_probe run's entry has
    if keep is not None:
        what["subset"] = keep
    entry = cache.entry("train", backbone, what, lambda batch: backbone.prefix_output(n, batch))
    stats: CacheStats = cache.cache.stats
    values = entry["values"].double()
    targets = task.soft_targets(entry["labels"]).double().reshape(len(values), -1)
    probs = None
    if backbone.source_classifier is not None:
        weight, bias = backbone.source_classifier
        probs = torch.softmax(values @ weight.double().T + bias.double(), dim=1).numpy()
    data = Features(values.numpy(), targets.numpy(), task.name, probs)
    return data, stats.hits > 0, stats.seconds_computing, backbone.feature_dim


def score(
    candidate: Candidate, names: list[str], examples: int | None, tracking: TrackingConfig, launch_dir: Path
) -> Scored:
    """One candidate's MLflow run (tagged role=rank, nested under the parent): params as a run's, scores as
    metrics `rank/<score>`, and the seconds spent."""
    tags = {
        ROLE_TAG: RANK_ROLE,
        "candidate": candidate.name,
        "backbone": candidate.raw.backbone.name,
        "data": candidate.raw.data.name,
        **source_tags("python -m src.rank candidate " + " ".join(candidate.overrides)),
    }
    with MLflowRun(tracking, launch_dir, f"rank·{candidate.name}", tags) as tracker:
        tracker.log_params(flatten(OmegaConf.to_container(candidate.raw, resolve=True)))
        tracker.log_text("\n".join(candidate.overrides) + "\n", "overrides.txt")
        start = time.perf_counter()
        data, hit, encoding, dim = features_of(candidate, examples)
        scored = Scored(candidate, tracker.run_id, cache_hit=hit, seconds_features=encoding, feature_dim=dim)
        scored.examples = len(data.x)
        for name in names:
            if score_schema(name).needs_source and data.source_probs is None:
                continue
            scored.scores[name] = float(SCORES.factory(name)(SCORES.config({"name": name}), data))
        scored.seconds = time.perf_counter() - start
        tracker.log_metrics(
            {
                **{f"rank/{k}": v for k, v in scored.scores.items()},
                "rank/seconds": scored.seconds,
                "rank/seconds_features": encoding,
                "rank/feature_dim": float(dim),
                "rank/examples": float(scored.examples),
                f"cache/{NAMESPACE}/hits": float(hit),
            }
        )
    return scored


def rank(settings: RankSettings, pool: list[Candidate], names: list[str], launch_dir: Path) -> Path:
    """Score every candidate (skipping, with its one line, any that fails), then write and log the ranking and its
    agreement with the measured runs; returns the report folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out = Path(launch_dir, settings.out or f"reports/rank-{stamp}")
    tracking = TrackingConfig(uri=settings.uri, experiment=settings.experiment)
    title = settings.preset or f"{len(pool)} candidates"
    parent_tags = {ROLE_TAG: RANK_ROLE, "rank.candidates": str(len(pool)), **source_tags("python -m src.rank")}
    started = time.perf_counter()
    with MLflowRun(tracking, launch_dir, f"rank·{title}·{stamp}", parent_tags) as parent:
        parent.log_params(flatten({"rank": {k: v for k, v in vars(settings).items() if k != "uri"}}))
        child = TrackingConfig(uri=settings.uri, experiment=settings.experiment, parent_run_id=parent.run_id)
        results: list[Scored] = []
        skipped: dict[str, str] = {}
        for candidate in pool:
            print(f"rank: {candidate.name} ({' '.join(candidate.overrides)})", flush=True)
            try:
                results.append(score(candidate, names, settings.examples, child, launch_dir))
            except Exception as e:  # noqa: BLE001 - one candidate that fails must not stop the ranking
                skipped[candidate.name] = one_line(e)
                print(f"rank: {candidate.name} skipped: {skipped[candidate.name]}", flush=True)
        if len(results) < 2:
            raise ConfigError(
                f"candidates: {len(results)} of {len(pool)} could be scored (at least 2 are needed); "
                + "; ".join(f"{k}: {v}" for k, v in skipped.items())
            )
        seconds = time.perf_counter() - started
        measured = measured_for(settings, results, launch_dir)
        files = report.write(out, title, results, names, skipped, measured, seconds, settings)
        parent.log_metrics(report.parent_metrics(results, measured, seconds))
        for path in files:
            parent.log_artifact(path)
    print((out / "report.md").read_text(encoding="utf-8"))
    print(f"Report written to {out} and logged to MLflow run {parent.run_id} (tag role=rank) at {parent.uri}")
    return out


def measured_for(settings: RankSettings, results: list[Scored], launch_dir: Path) -> Measured | None:
    """The measured runs of the same candidates on the same data, or None (with the reason printed)."""
    try:
        return measured_runs(settings, [r.candidate for r in results], launch_dir)
    except ConfigError as e:
        print(f"rank: no measured runs to check the ranking against ({e})", flush=True)
        return None
