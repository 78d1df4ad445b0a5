"""Transferability scores of frozen features, in numpy only (no torch): what `python -m src.rank` computes per
candidate backbone from the training split's cached features, and how well a score ranks what runs measured.

Every score is "higher is better", so one ranking convention serves all of them:

- `logme`: LogME (You et al. 2021), the maximised log evidence per example of a Bayesian linear model from the
  features to each target column (one-hot classes, tags, or regression outputs), averaged over the columns;
- `hscore`: H-score (Bao et al. 2019) with the Ledoit-Wolf shrinkage of Ibrahim et al. (2022),
  tr(cov(f)^-1 cov(E[f|y])): how far apart the class means are for the features' spread;
- `knn`: leave-one-out k-nearest-neighbour accuracy (cosine; regression: R^2 of the neighbours' mean);
- `linear`: leave-one-out accuracy (regression: R^2) of a ridge probe, closed form (no training loop), with the
  ridge strength chosen from a grid by the same leave-one-out error;
- `nce`, `leep`: NCE (Tran et al. 2019) and LEEP (Nguyen et al. 2020) from the predictions of the backbone's
  source classifier head on the target examples.

The schemas that register them (and say which tasks each applies to) are in `src.rank.config`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from src.rank.config import HScoreConfig, KNNConfig, LinearConfig, LogMEConfig, SourceScoreConfig


@dataclass
class Features:
    """One candidate's training split as the scores see it."""

    x: np.ndarray  # (N, D) pooled frozen features
    targets: np.ndarray  # (N, K) the task's soft targets: one-hot classes, multi-hot tags, regression outputs
    task: str  # classification | multilabel | regression (the task's registry name)
    source_probs: np.ndarray | None = None  # (N, Z) the source head's softmax, when the backbone has one

    @property
    def classes(self) -> np.ndarray:
        """Class index per example (classification only)."""
        return self.targets.argmax(axis=1)


# --- LogME -------------------------------------------------------------------------------------------------------


@dataclass
class Evidence:
    """LogME's fixed point for one target column: the prior and noise precisions and the evidence per example."""

    alpha: float
    beta: float
    evidence: float


def logme_column(x: np.ndarray, y: np.ndarray, eigvals: np.ndarray, vecs: np.ndarray) -> Evidence:
    """MacKay's fixed-point iteration for y ~ N(x w, 1/beta), w ~ N(0, 1/alpha) (the LogME paper's Algorithm 1)
    run to convergence from several starting ratios alpha/beta, keeping the fixed point of highest evidence: with
    more features than examples the evidence has more than one stationary point, and one start can end in the
    degenerate one (w = 0, the features ignored). `eigvals`, `vecs`: the eigen-decomposition of x^T x, shared by
    every column."""
    n, d = x.shape
    proj = vecs.T @ (x.T @ y)  # x^T y in the eigenbasis
    yy = float(y @ y)

    def fit(alpha: float, beta: float) -> tuple[float, float, float]:
        """gamma, |m|^2 and |y - x m|^2 at the posterior mean m for these precisions."""
        m = beta * proj / (alpha + beta * eigvals)  # in the eigenbasis: |m| and x m = (x vecs) m keep their values
        residual = max(float(((y - x @ (vecs @ m)) ** 2).sum()), 1e-300)
        return float((beta * eigvals / (alpha + beta * eigvals)).sum()), float(m @ m), residual

    def evidence(alpha: float, beta: float) -> float:
        _, m2, residual = fit(alpha, beta)
        total = (
            d * np.log(alpha)
            + n * np.log(beta)
            - np.sum(np.log(alpha + beta * eigvals))
            - beta * residual
            - alpha * m2
            - n * np.log(2 * np.pi)
        )
        return float(total / 2 / n)

    best: Evidence | None = None
    scale = max(float(eigvals.mean()), 1e-12)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # a diverging start is dropped below
        for ratio in (1e-6, 1e-4, 1e-2, 1.0, 1e2):
            beta = n / max(yy, 1e-12)
            alpha = ratio * scale * beta
            for _ in range(1000):
                gamma, m2, residual = fit(alpha, beta)
                new_alpha, new_beta = gamma / max(m2, 1e-300), (n - gamma) / residual
                done = abs(new_alpha / new_beta - alpha / beta) <= 1e-8 * alpha / beta
                alpha, beta = new_alpha, new_beta
                if done:
                    break
            found = Evidence(alpha, beta, evidence(alpha, beta))
            if np.isfinite(found.evidence) and (best is None or found.evidence > best.evidence):
                best = found
    if best is None:
        raise FloatingPointError("LogME: no start converged to a finite evidence")
    return best


def logme(x: np.ndarray, targets: np.ndarray) -> float:
    """Mean over target columns of the maximised evidence per example (one evidence per class, tag or output)."""
    x = np.asarray(x, dtype=np.float64)
    eigvals, vecs = np.linalg.eigh(x.T @ x)
    # x^T x has rank <= min(n, d): round-off makes its zero eigenvalues tiny (even negative) numbers, which an
    # interpolating fit (beta -> infinity) would count as directions of the features.
    eigvals = np.where(eigvals > eigvals.max() * 1e-10, eigvals, 0.0)
    columns = np.asarray(targets, dtype=np.float64).reshape(len(x), -1).T
    # A column constant on the training split (a tag no example has) says nothing about the features, and all-zero
    # targets have unbounded evidence (a perfect fit by w = 0): left out.
    varying = [y for y in columns if np.ptp(y) > 0]
    if not varying:
        raise ValueError("LogME: every target column is constant on the training split")
    return float(np.mean([logme_column(x, y, eigvals, vecs).evidence for y in varying]))


def logme_score(cfg: LogMEConfig, data: Features) -> float:
    return logme(data.x, data.targets)


# --- H-score -----------------------------------------------------------------------------------------------------


def ledoit_wolf_shrinkage(centered: np.ndarray) -> float:
    """The Ledoit-Wolf (2004) shrinkage intensity towards a scaled identity, for centred samples (rows)."""
    n, d = centered.shape
    cov = centered.T @ centered / n
    mu = np.trace(cov) / d
    delta = ((cov - mu * np.eye(d)) ** 2).sum() / d
    squares = centered**2
    beta = ((squares.T @ squares) / n - cov**2).sum() / (d * n)
    return float(min(beta, delta) / delta) if delta > 0 else 1.0


def h_score(x: np.ndarray, classes: np.ndarray, shrinkage: float | None = None) -> float:
    """tr(cov(f)^-1 cov(E[f|y])). `shrinkage` None: Ledoit-Wolf's (the regularised H-score, which keeps cov(f)
    invertible when features outnumber examples); 0: the plain H-score with a pseudo-inverse."""
    x = np.asarray(x, dtype=np.float64)
    centered = x - x.mean(axis=0)
    n, d = centered.shape
    shrink = ledoit_wolf_shrinkage(centered) if shrinkage is None else shrinkage
    cov = centered.T @ centered / n
    cov_f = (1 - shrink) * cov + shrink * np.trace(cov) / d * np.eye(d)
    means = np.zeros_like(centered)
    for c in np.unique(classes):
        means[classes == c] = centered[classes == c].mean(axis=0)
    cov_g = means.T @ means / n
    return float(np.trace(np.linalg.pinv(cov_f, rcond=1e-15, hermitian=True) @ ((1 - shrink) * cov_g)))


def hscore_score(cfg: HScoreConfig, data: Features) -> float:
    return h_score(data.x, data.classes, None if cfg.shrink else 0.0)


# --- leave-one-out probes ----------------------------------------------------------------------------------------


def _standardise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    std = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)


def r2(y: np.ndarray, predicted: np.ndarray) -> float:
    """Coefficient of determination over all output columns (1 - SSE / SST)."""
    total = ((y - y.mean(axis=0)) ** 2).sum()
    return float(1 - ((y - predicted) ** 2).sum() / total) if total > 0 else 0.0


def _quality(data: Features, predicted: np.ndarray) -> float:
    """Accuracy of predicted class scores, or R^2 of predicted regression outputs."""
    if data.task == "regression":
        return r2(data.targets, predicted)
    return float((predicted.argmax(axis=1) == data.classes).mean())


def knn_predictions(x: np.ndarray, targets: np.ndarray, k: int, chunk: int = 2048) -> np.ndarray:
    """Each example's mean target over its k most cosine-similar other examples (leave-one-out)."""
    unit = np.asarray(x, dtype=np.float64)
    unit = unit / np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)
    k = min(k, len(unit) - 1)
    out = np.empty((len(unit), targets.shape[1]))
    for start in range(0, len(unit), chunk):
        sims = unit[start : start + chunk] @ unit.T
        rows = np.arange(len(sims))
        sims[rows, start + rows] = -np.inf  # never its own neighbour
        nearest = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        out[start : start + chunk] = targets[nearest].mean(axis=1)
    return out


def knn_score(cfg: KNNConfig, data: Features) -> float:
    return _quality(data, knn_predictions(data.x, data.targets.astype(np.float64), cfg.k))


def ridge_loo_predictions(x: np.ndarray, targets: np.ndarray, lam: float) -> np.ndarray:
    """Leave-one-out predictions of ridge regression (intercept via centring) in closed form:
    y_i - (y_i - yhat_i) / (1 - h_ii), with the hat matrix from one SVD."""
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    mean = targets.mean(axis=0)
    y = targets - mean
    shrink = s**2 / (s**2 + lam)
    fitted = u @ (shrink[:, None] * (u.T @ y))
    hat = (u**2) @ shrink + 1 / len(x)  # + the intercept's leverage
    return targets - (targets - fitted - mean) / (1 - hat)[:, None]


def linear_score(cfg: LinearConfig, data: Features) -> float:
    """The best leave-one-out quality over the ridge grid (strengths relative to the number of examples)."""
    x = _standardise(data.x)
    targets = data.targets.astype(np.float64)
    return max(_quality(data, ridge_loo_predictions(x, targets, lam * len(x))) for lam in cfg.ridge)


# --- scores from a source classifier's predictions ---------------------------------------------------------------


def nce(source_labels: np.ndarray, classes: np.ndarray) -> float:
    """Negative conditional entropy -H(Y | Z) of the target classes given the source head's hard predictions."""
    z_values, z = np.unique(source_labels, return_inverse=True)
    y_values, y = np.unique(classes, return_inverse=True)
    joint = np.zeros((len(z_values), len(y_values)))
    np.add.at(joint, (z, y), 1.0)
    joint /= joint.sum()
    conditional = joint / joint.sum(axis=1, keepdims=True)
    nonzero = joint > 0
    return float((joint[nonzero] * np.log(conditional[nonzero])).sum())


def leep(source_probs: np.ndarray, classes: np.ndarray) -> float:
    """LEEP: mean log-likelihood of the empirical predictor p(y|x) = sum_z p(y|z) theta_z(x)."""
    probs = np.asarray(source_probs, dtype=np.float64)
    onehot = np.eye(int(classes.max()) + 1)[classes]
    joint = onehot.T @ probs / len(probs)  # P(y, z)
    conditional = joint / np.maximum(joint.sum(axis=0, keepdims=True), 1e-300)  # P(y | z)
    predicted = probs @ conditional.T  # (N, Y)
    return float(np.log(predicted[np.arange(len(classes)), classes]).mean())


def nce_score(cfg: SourceScoreConfig, data: Features) -> float:
    return nce(data.source_probs.argmax(axis=1), data.classes)


def leep_score(cfg: SourceScoreConfig, data: Features) -> float:
    return leep(data.source_probs, data.classes)


# --- agreement between a score's ranking and the measured one ----------------------------------------------------


@dataclass
class Agreement:
    """Weighted Kendall tau and Spearman rho between a score and the measured metric, with bootstrap intervals."""

    tau: float
    tau_low: float
    tau_high: float
    rho: float
    rho_low: float
    rho_high: float


def weighted_tau(score: Sequence[float], measured: Sequence[float]) -> float:
    """scipy's weighted tau (hyperbolic weights, top ranks count most, both rankings averaged)."""
    return float(stats.weightedtau(score, measured).statistic)


def spearman(score: Sequence[float], measured: Sequence[float]) -> float:
    return float(stats.spearmanr(score, measured).statistic)


def agreement(
    score: Sequence[float],
    replicates: Sequence[Sequence[float]],
    maximize: bool = True,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Agreement:
    """How well `score` (one value per candidate) orders the candidates' measured means (`replicates`: each
    candidate's runs, e.g. its seeds), oriented so that +1 means the score ranks the best-measured first. The
    interval resamples each candidate's runs with replacement (a bootstrap over seeds/runs) and recomputes both
    statistics on the resampled means; a resample with constant means (no ranking) is left out. With one run per
    candidate there is no interval (NaN)."""
    sign = 1.0 if maximize else -1.0
    score = np.asarray(score, dtype=np.float64)
    runs = [np.asarray(r, dtype=np.float64) * sign for r in replicates]
    means = np.array([r.mean() for r in runs])
    rng = np.random.default_rng(seed)
    taus, rhos = [], []
    for _ in range(resamples if any(len(r) > 1 for r in runs) else 0):  # one run each: nothing to resample
        drawn = np.array([rng.choice(r, size=len(r)).mean() for r in runs])
        if np.ptp(drawn) == 0:
            continue
        taus.append(weighted_tau(score, drawn))
        rhos.append(spearman(score, drawn))
    tail = 100 * (1 - confidence) / 2
    low_tau, high_tau = np.percentile(taus, [tail, 100 - tail]) if taus else (np.nan, np.nan)
    low_rho, high_rho = np.percentile(rhos, [tail, 100 - tail]) if rhos else (np.nan, np.nan)
    return Agreement(
        weighted_tau(score, means),
        float(low_tau),
        float(high_tau),
        spearman(score, means),
        float(low_rho),
        float(high_rho),
    )
