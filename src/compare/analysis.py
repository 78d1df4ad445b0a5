"""Groups of runs (one per combination of the config values that vary; seeds are replicates), each compared with
the best group on the same data and with the from-scratch baseline, and the recommendations drawn from them."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from src.compare.runs import RunRecord, Selection
from src.compare.stats import Estimate, difference, mean_interval
from src.schema import ConfigError

# Never a grouping key: replication (seed, cross-validation fold), where results go, and knobs that cannot change a
# result.
IGNORED = {"seed", "cv.fold", "ckpt_path", "backbone.cache_dir", "data.num_workers"}
IGNORED_PREFIXES = ("tracking.", "sweep.", "hydra.", "trainer.enable_", "trainer.log_every_n_steps")
GROUP_TAGS = ("data", "backbone", "finetune")  # the options users pick; shown before any other key
# The training-set size axis, first varying one wins (override with size=KEY).
SIZE_KEYS = ("data.max_train_per_class", "data.labels_per_class", "data.max_train_samples")
SCRATCH = "scratch"


def varying_keys(runs: Sequence[RunRecord]) -> list[str]:
    """Config keys whose value differs between runs (missing = unset counts as a value)."""
    keys = set(GROUP_TAGS) | {k for r in runs for k in r.params}
    keys = {k for k in keys if k not in IGNORED and not k.startswith(IGNORED_PREFIXES)}
    return [k for k in keys if len({r.value(k) for r in runs}) > 1]


def _order(key: str) -> tuple[int, str]:
    return (GROUP_TAGS.index(key), "") if key in GROUP_TAGS else (len(GROUP_TAGS), key)


def grouping_keys(runs: Sequence[RunRecord], by: Sequence[str] | None = None) -> list[str]:
    """`by` as given (each must be known to some run), else the varying keys that split the runs further than
    the keys before them: `finetune.probe_epochs` adds nothing once `finetune` is a key, so it is dropped."""
    if by:
        for key in by:
            if all(r.value(key) is None for r in runs):
                near = sorted(k for k in {*GROUP_TAGS, *(k for r in runs for k in r.params)} if key in k)[:8]
                hint = f"; keys containing it: {', '.join(near)}" if near else ""
                raise ConfigError(f"by: no run has a value for {key!r}{hint}")
        return list(by)
    kept: list[str] = []
    parts = 1
    for key in sorted(varying_keys(runs), key=_order):
        n = len({tuple(r.value(k) for k in [*kept, key]) for r in runs})
        if n > parts:
            kept.append(key)
            parts = n
    return kept


def as_number(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


@dataclass
class Group:
    values: dict[str, str | None]  # grouping key -> value
    runs: list[RunRecord]
    metric: Estimate  # the compared metric
    val: Estimate | None
    test: Estimate | None
    trainable_params: float | None
    seconds_per_epoch: float | None
    seconds: float | None
    context: tuple  # values of the data keys: groups are compared only within one context
    vs_best: Estimate | None = None  # this group minus the best group of its context
    is_best: bool = False
    baseline: Group | None = None  # the from-scratch group on the same data
    gain: Estimate | None = None  # this group minus the baseline (oriented: positive = better)

    def label(self, keys: Sequence[str] | None = None) -> str:
        keys = self.values if keys is None else keys
        return ", ".join(f"{k}={self.values[k]}" for k in keys) or "all runs"

    def by_seed(self, compared: str) -> dict:
        """The compared metric (`val` or `test`) per replicate; see `replicates`."""
        return self.replicates(lambda r: getattr(r, compared))

    def replicates(self, value: Callable[[RunRecord], float | None]) -> dict:
        """`value` of each run that has one, per replicate: the seed, or (seed, fold) under k-fold, so differences
        pair by fold (the fold fixes the validation examples) and by seed; runs without a seed or with a repeated key
        get their own key (never paired)."""
        out: dict = {}
        for r in self.runs:
            if (v := value(r)) is None:
                continue
            fold = r.value("cv.fold") if r.value("cv.folds") is not None else None
            replicate = r.seed if fold is None else (r.seed, fold)
            key = replicate if r.seed is not None and replicate not in out else ("run", r.run_id)
            out[key] = v
        return out

    @property
    def within_noise(self) -> bool | None:
        """Not distinguishable from the best: the difference's interval contains 0 (None without interval)."""
        return True if self.is_best else (self.vs_best.contains(0.0) if self.vs_best else None)

    @property
    def negative_transfer(self) -> bool | None:
        """Worse than training from scratch beyond noise."""
        if self.gain is None or not self.gain.has_interval:
            return None
        return self.gain.high < 0

    @property
    def is_scratch(self) -> bool:
        return all(r.value("finetune") == SCRATCH or r.value("finetune.name") == SCRATCH for r in self.runs)


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


def _estimate(values: list[float | None], confidence: float) -> Estimate | None:
    known = [v for v in values if v is not None]
    return mean_interval(known, confidence) if known else None


@dataclass
class Comparison:
    selection: Selection
    keys: list[str]  # grouping keys
    data_keys: list[str]  # the grouping keys that define "the same data" (data, data.*)
    size_key: str | None  # the training-set size axis, when it varies
    groups: list[Group]
    confidence: float
    notes: list[str] = field(default_factory=list)

    @property
    def series_keys(self) -> list[str]:
        """What distinguishes groups on the same data: a strategy, a backbone, an LR..."""
        return [k for k in self.keys if k not in self.data_keys]

    def orient(self, x: float) -> float:
        """Signed so that positive is better."""
        return x if self.selection.maximize else -x


def compare(
    selection: Selection, by: Sequence[str] | None = None, size: str | None = None, confidence: float = 0.95
) -> Comparison:
    runs = selection.runs
    keys = grouping_keys(runs, by)
    if size is not None:
        if all(r.value(size) is None for r in runs):
            raise ConfigError(f"size: no run has a value for {size!r}")
        if size not in keys:
            keys.append(size)
    else:
        size = next((k for k in SIZE_KEYS if k in keys), None)
    if size is not None and any(as_number(r.value(size)) is None for r in runs):
        raise ConfigError(
            f"size: {size!r} must be a number in every run; got {sorted({r.value(size) for r in runs}, key=str)}"
        )
    data_keys = [k for k in keys if k == "data" or k.startswith("data.")]
    compared = selection.compared
    buckets: dict[tuple, list[RunRecord]] = {}
    for r in runs:
        buckets.setdefault(tuple(r.value(k) for k in keys), []).append(r)
    groups = []
    for values, members in buckets.items():
        named = dict(zip(keys, values, strict=True))
        epochs = [r.seconds / r.epochs if r.seconds and r.epochs else None for r in members]
        groups.append(
            Group(
                values=named,
                runs=members,
                metric=mean_interval([getattr(r, compared) for r in members], confidence),
                val=_estimate([r.val for r in members], confidence),
                test=_estimate([r.test for r in members], confidence),
                trainable_params=_mean([r.trainable_params for r in members]),
                seconds_per_epoch=_mean(epochs),
                seconds=_mean([r.seconds for r in members]),
                context=tuple(named[k] for k in data_keys),
            )
        )
    comparison = Comparison(selection, keys, data_keys, size, groups, confidence)
    _compare_with_best(comparison)
    _transfer_gain(comparison)
    comparison.groups.sort(key=lambda g: (_context_order(g, comparison), -comparison.orient(g.metric.mean)))
    return comparison


def _context_order(group: Group, comparison: Comparison) -> tuple:
    size = as_number(group.values[comparison.size_key]) if comparison.size_key else 0.0
    return (
        tuple(str(v) for k, v in group.values.items() if k in comparison.data_keys and k != comparison.size_key),
        size,
    )


def contexts(comparison: Comparison) -> dict[tuple, list[Group]]:
    out: dict[tuple, list[Group]] = {}
    for g in comparison.groups:
        out.setdefault(g.context, []).append(g)
    return out


def _compare_with_best(comparison: Comparison) -> None:
    compared = comparison.selection.compared
    for members in contexts(comparison).values():
        best = max(members, key=lambda g: comparison.orient(g.metric.mean))
        best.is_best = True
        for g in members:
            if g is not best:
                g.vs_best = oriented(
                    difference(g.by_seed(compared), best.by_seed(compared), comparison.confidence), comparison
                )


def oriented(est: Estimate, comparison: Comparison) -> Estimate:
    """A difference a - b flipped for minimised metrics, so positive always means `a` is better."""
    if comparison.selection.maximize:
        return est
    low, high = (-est.high, -est.low) if est.has_interval else (None, None)
    return Estimate(est.n, -est.mean, est.std, low, high, est.paired)


def _transfer_gain(comparison: Comparison) -> None:
    """Each group against the best from-scratch group on the same data (same backbone when backbones vary)."""
    compared = comparison.selection.compared
    scratch = [g for g in comparison.groups if g.is_scratch]
    if not scratch:
        comparison.notes.append("No from-scratch runs (finetune=scratch) on this data: no transfer gain.")
        return
    for g in comparison.groups:
        same = [s for s in scratch if s.context == g.context]
        if "backbone" in g.values:
            same = [s for s in same if s.values["backbone"] == g.values["backbone"]] or same
        if not same or g.is_scratch:
            continue
        g.baseline = max(same, key=lambda s: comparison.orient(s.metric.mean))
        g.gain = oriented(
            difference(g.by_seed(compared), g.baseline.by_seed(compared), comparison.confidence), comparison
        )


@dataclass
class Recommendation:
    size: float  # the measured size used
    requested: float
    candidates: list[Group]  # best and not significantly worse, cheapest first
    best: Group


def cost(group: Group) -> tuple[float, float]:
    """Cheapest first: fewer trainable parameters, then less time."""
    return (group.trainable_params if group.trainable_params is not None else math.inf, group.seconds or math.inf)


def recommend_at(comparison: Comparison, members: list[Group]) -> tuple[Group, list[Group]]:
    """The best group and those not significantly worse than it (no interval counts as not shown worse)."""
    best = next(g for g in members if g.is_best)
    keep = [g for g in members if g.within_noise is not False]
    return best, sorted(keep, key=cost)


def recommend(comparison: Comparison, size: float) -> Recommendation:
    """For a training-set size: the nearest measured size (on a log scale), its best and not-worse groups."""
    if comparison.size_key is None:
        raise ConfigError("recommend: these runs do not vary a training-set size (size=KEY names one)")
    if size <= 0:
        raise ConfigError(f"recommend: must be a positive training-set size; got {size}")
    by_size: dict[float, list[Group]] = {}
    for g in comparison.groups:
        by_size.setdefault(as_number(g.values[comparison.size_key]), []).append(g)
    nearest = min(by_size, key=lambda s: (abs(math.log(s / size)) if s > 0 else math.inf, s))
    members = by_size[nearest]
    if len({g.context for g in members}) > 1:
        raise ConfigError(
            f"recommend: size {nearest:g} was measured on several data sets ({', '.join(comparison.data_keys)} "
            "vary); select one with filter=..."
        )
    best, candidates = recommend_at(comparison, members)
    return Recommendation(nearest, size, candidates, best)
