"""Regression: one or several real-valued targets per example. The head predicts targets standardised on the
training split (`target_scaling: standard`), so one learning rate suits any unit; metrics and predictions are in
the original units. Losses MSE, Huber or L1; metrics MAE, RMSE, R², Pearson and Spearman (mean over targets)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn
from torchmetrics.functional import pearson_corrcoef, r2_score, spearman_corrcoef

from src.schema import ConfigError
from src.tasks.base import Cell, LabelFormat, Task, as_float, keep_valid
from src.tasks.config import RegressionConfig

CONSTANT_STD_RATIO = 0.05  # prediction std below this share of the target std counts as a constant prediction
N_BINS = 10  # quantile bins of the first target: the strata of seeded splits and per-bin caps


class NumberCodec:
    def __init__(self, cells: Sequence[Cell], fmt: LabelFormat, where: str) -> None:
        if fmt.names is not None and list(fmt.names) != list(fmt.columns):
            raise ConfigError("label_names: regression targets are named by their label_column(s), not label_names")
        self.fmt, self.names = fmt, list(fmt.columns)

    def encode(self, cells: Sequence[Cell], lines: Sequence[int], where: str) -> tuple[np.ndarray, np.ndarray]:
        rows = [cell if isinstance(cell, tuple) else (cell,) for cell in cells]
        values = [[as_float(v) for v in row] for row in rows]
        bad = [i for i, row in enumerate(values) if any(v is None or not np.isfinite(v) for v in row)]
        targets = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=np.float32)
        if not bad:
            return np.arange(len(rows)), targets
        i = bad[0]
        j = next(j for j, v in enumerate(values[i]) if v is None or not np.isfinite(v))
        what = f"{len(bad)} non-numeric target(s), e.g. {rows[i][j]!r} in column {self.names[j]!r}"
        keep = keep_valid(self.fmt, where, what, bad, lines, len(rows))
        return keep, targets[keep]


class Regression(Task):
    name = "regression"
    collapse_metric = "std_ratio"
    cfg: RegressionConfig

    def codec(self, cells: Sequence[Cell], fmt: LabelFormat, where: str) -> NumberCodec:
        return NumberCodec(cells, fmt, where)

    def strata(self, targets: np.ndarray) -> np.ndarray:
        first = targets[:, 0]
        edges = np.unique(np.quantile(first, np.linspace(0, 1, N_BINS + 1)[1:-1]))
        return np.digitize(first, edges)

    def check_train(self, targets: np.ndarray, where: str) -> None:
        if len(targets) > 1 and (constant := [n for n, s in zip(self.names, targets.std(0), strict=True) if s == 0]):
            raise ConfigError(f"{where}: target column(s) {constant} have one value in every row: nothing to learn")

    def bind(self, names: list[str], train_targets: np.ndarray | None) -> None:
        super().bind(names, train_targets)
        mean, std = torch.zeros(len(names)), torch.ones(len(names))
        if self.cfg.target_scaling == "standard" and train_targets is not None:
            mean = torch.as_tensor(train_targets.mean(0), dtype=torch.float32)
            std = torch.as_tensor(train_targets.std(0), dtype=torch.float32).clamp(min=1e-8)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def values(self, outputs: torch.Tensor) -> torch.Tensor:
        """Outputs in the targets' original units."""
        return outputs.float() * self.std + self.mean

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        scaled = (targets.to(outputs.dtype) - self.mean) / self.std
        if self.cfg.loss == "huber":
            return nn.functional.huber_loss(outputs, scaled, delta=self.cfg.huber_delta)
        return (nn.functional.l1_loss if self.cfg.loss == "l1" else nn.functional.mse_loss)(outputs, scaled)

    def evaluate(self, outputs: torch.Tensor, targets: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
        predicted, truth = self.values(outputs), targets.float()
        d = predicted.shape[1]
        flat = (predicted.squeeze(1), truth.squeeze(1)) if d == 1 else (predicted, truth)

        def mean(x: torch.Tensor) -> torch.Tensor:
            return x.float().mean()

        def correlation(fn: Callable) -> torch.Tensor:
            """Undefined for a constant prediction (NaN): reported as 0, no correlation; std_ratio flags it."""
            if (predicted.std(0) == 0).any() or len(truth) < 2:
                return torch.tensor(0.0)
            return mean(fn(*flat))

        return {
            f"{prefix}mae": (predicted - truth).abs().mean(),
            f"{prefix}rmse": (predicted - truth).pow(2).mean(0).sqrt().mean(),
            f"{prefix}r2": mean(r2_score(*flat, multioutput="raw_values")) if len(truth) > 1 else torch.tensor(0.0),
            f"{prefix}pearson": correlation(pearson_corrcoef),
            f"{prefix}spearman": correlation(spearman_corrcoef),
            f"{prefix}loss": self.loss(outputs.float(), truth),
            # Prediction spread over target spread: near 0 means one value predicted for everything (src.health).
            f"{prefix}std_ratio": mean(predicted.std(0) / truth.std(0).clamp(min=1e-8)),
        }

    def collapse_message(self, value: float, lr: float) -> tuple[str, str] | None:
        if value >= CONSTANT_STD_RATIO:
            return None
        return (
            "constant",
            f"the predictions' spread is {value:.1%} of the targets' on the validation set: the model predicts "
            f"(nearly) one value for everything; try another optim.lr (now {lr:g}) or check the target column",
        )

    def report(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, Figure | dict]:
        """Predicted vs true per target, with the identity line: bias and range compression show at a glance."""
        from src.tracking.plots import plt

        predicted, truth = self.values(outputs).cpu().numpy(), targets.float().cpu().numpy()
        d = len(self.names)
        fig, axes = plt.subplots(1, d, figsize=(4 * d, 4), squeeze=False)
        for ax, name, p, t in zip(axes[0], self.names, predicted.T, truth.T, strict=True):
            ax.scatter(t, p, s=6, alpha=0.5)
            lo, hi = float(min(t.min(), p.min())), float(max(t.max(), p.max()))
            ax.plot([lo, hi], [lo, hi], color="grey", linewidth=1)
            ax.set(xlabel=f"true {name}", ylabel=f"predicted {name}", title=name)
        fig.tight_layout()
        return {"predicted_vs_true.png": fig}

    def predict(self, outputs: np.ndarray) -> dict[str, np.ndarray]:
        values = outputs * self.std.cpu().numpy() + self.mean.cpu().numpy()
        return {f"pred_{n}": values[:, i] for i, n in enumerate(self.names)}

    def prediction_columns(self) -> list[tuple[str, str]]:
        return [(f"pred_{n}", "double") for n in self.names]
