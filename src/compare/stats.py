"""Seed statistics: t-intervals of a mean and of a difference (paired by seed or Welch), and the expected best of
k random-search trials (Dodge et al. 2020). Pure functions of numbers, so they are tested against known values."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Estimate:
    """A mean with its spread; `low`/`high` is the confidence interval, None when it cannot be computed (n = 1)."""

    n: int
    mean: float
    std: float | None  # sample standard deviation (ddof = 1); None for n = 1
    low: float | None = None
    high: float | None = None
    paired: bool | None = None  # differences only: paired by seed (True) or Welch (False)

    @property
    def has_interval(self) -> bool:
        return self.low is not None and self.high is not None

    def contains(self, value: float) -> bool | None:
        """Whether the interval contains `value`; None without an interval."""
        return self.low <= value <= self.high if self.has_interval else None


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Estimate:
    """Mean ± Student-t interval; n = 1 gives the value with no std and no interval rather than a fake one."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("mean_interval: no values")
    mean = float(x.mean())
    if x.size == 1:
        return Estimate(1, mean, None)
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, x.size - 1)) * std / math.sqrt(x.size)
    return Estimate(int(x.size), mean, std, mean - half, mean + half)


def difference(
    a: Mapping[Hashable, float], b: Mapping[Hashable, float], confidence: float = 0.95, pair: bool = True
) -> Estimate:
    """Mean of `a` minus mean of `b` (each keyed by seed). Paired by seed when both have the same >= 2 seeds (the
    seed fixes the data subset and the init, so pairing removes that shared noise); otherwise Welch's interval."""
    if pair and len(a) >= 2 and a.keys() == b.keys():
        est = mean_interval([a[s] - b[s] for s in a], confidence)
        return Estimate(est.n, est.mean, est.std, est.low, est.high, paired=True)
    xa, xb = np.asarray(list(a.values()), float), np.asarray(list(b.values()), float)
    diff = float(xa.mean() - xb.mean())
    if xa.size < 2 or xb.size < 2:
        return Estimate(min(xa.size, xb.size), diff, None, paired=False)
    va, vb = xa.var(ddof=1) / xa.size, xb.var(ddof=1) / xb.size
    se = math.sqrt(va + vb)
    if se == 0.0:
        return Estimate(min(xa.size, xb.size), diff, 0.0, diff, diff, paired=False)
    df = float(va + vb) ** 2 / (va**2 / (xa.size - 1) + vb**2 / (xb.size - 1))  # Welch-Satterthwaite
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
    return Estimate(min(xa.size, xb.size), diff, se, diff - half, diff + half, paired=False)


def expected_max(values: Sequence[float], maximize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Expected best value (and its std) of k trials drawn with replacement from `values`, for k = 1..N.

    Dodge et al. 2020, "Show your work": with v_(1) <= ... <= v_(N), P(max of k = v_(i)) = (i/N)^k - ((i-1)/N)^k.
    """
    v = np.sort(np.asarray(values, dtype=float))
    if not maximize:
        v = -v[::-1]
    n = v.size
    i = np.arange(1, n + 1)
    ks = np.arange(1, n + 1)[:, None]
    p = (i / n) ** ks - ((i - 1) / n) ** ks  # (k, i)
    mean = p @ v
    std = np.sqrt(np.maximum(p @ v**2 - mean**2, 0.0))
    return (mean if maximize else -mean), std
