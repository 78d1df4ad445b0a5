"""The task contract: everything that depends on what a run predicts, asked by the data modules (how a label cell
becomes a target, how splits are stratified), the module (head size, loss, metrics, health) and the exports
(prediction columns). One object per run; an `nn.Module`, so what it learns from the data (a regression target's
scale, tuned thresholds) travels in every checkpoint and logged model.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from src.schema import ConfigError
from src.tasks.config import TaskConfig

Cell = Any  # one row's label: a text (one column) or a tuple of texts (several label columns)


@dataclass
class LabelFormat:
    """How a table writes its labels (the data config's label keys)."""

    columns: list[str]  # label_column(s)
    names: list[str] | None  # label_names: classes/tags in index order
    base: int | None  # integer labels index names from 0 or 1; None: inferred
    separator: str | None  # multilabel: tags in one cell, e.g. "8,20"
    bad_rows: str  # error | skip


class Codec(Protocol):
    """Label cells -> targets, learned from the training table (class names, tag names, target columns)."""

    names: list[str]

    def encode(self, cells: Sequence[Cell], lines: Sequence[int], where: str) -> tuple[np.ndarray, np.ndarray]:
        """`(rows kept, targets)`: rows whose label is invalid raise or, with bad_rows: skip, are dropped."""
        ...


def keep_valid(
    fmt: LabelFormat, where: str, what: str, bad: list[int], lines: Sequence[int], n: int, known: str = ""
) -> np.ndarray:
    """The rows of `n` to keep when rows `bad` have invalid labels: raise, or (bad_rows: skip) warn and leave them
    out; the message names the file, the rows' lines and (`known`) what labels are valid."""
    from src.data.tables import listed

    message = f"{where} has {what} (line(s) {listed([lines[i] for i in bad])})" + (f"; {known}" if known else "")
    if fmt.bad_rows == "error":
        raise ConfigError(message)
    warnings.warn(f"{message}; skipped (bad_rows: skip)", UserWarning, stacklevel=3)
    return np.setdiff1d(np.arange(n), bad)


def as_float(text: Any) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def as_int(text: Any) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


def sorted_labels(labels: Sequence[str]) -> list[str]:
    """Unique labels, numerically ordered when they are all integers ("2" before "10"), else alphabetically."""
    unique = set(labels)
    try:
        return sorted(unique, key=int)
    except ValueError:
        return sorted(unique)


class Task(nn.Module):
    """What a run predicts. Subclasses set `name` (the registry name), `empty_label` and `collapse_metric`."""

    name: ClassVar[str]
    empty_label: ClassVar[bool] = False  # whether a row with an empty label cell is an example (no tag)
    collapse_metric: ClassVar[str]  # the `val/<name>` HealthCheck watches for a collapsed model

    def __init__(self, cfg: TaskConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.names: list[str] = []  # classes, tags or target columns, in output order

    # --- data ---
    def codec(self, cells: Sequence[Cell], fmt: LabelFormat, where: str) -> Codec:
        raise NotImplementedError

    def strata(self, targets: np.ndarray) -> np.ndarray:
        """One stratum per example, so seeded splits and per-class caps keep each part representative."""
        raise NotImplementedError

    def bind(self, names: list[str], train_targets: np.ndarray | None) -> None:
        """Fix the output names and learn what the training targets say (scale, frequencies); None: restoring a
        saved model, whose state dict then fills the buffers."""
        self.names = list(names)

    def check_train(self, targets: np.ndarray, where: str) -> None:
        """Refuse training targets no model of this task could learn from."""

    @property
    def num_outputs(self) -> int:
        return len(self.names)

    # --- training ---
    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        raise NotImplementedError

    def soft_targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Targets as floats that can be mixed (mixup): one-hot classes, multi-hot tags, the numbers themselves."""
        return labels.float()

    def train_metrics(self) -> dict[str, Any]:
        """Cheap per-step metrics accumulated over a training epoch (`train/<name>`), fed `(outputs, labels)`."""
        return {}

    # --- evaluation ---
    def on_validation(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """What the task learns from a whole validation pass (tuned thresholds), before it is scored."""

    def evaluate(self, outputs: torch.Tensor, targets: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
        """Every metric of one pass over a split, `loss` and `collapse_metric` included."""
        raise NotImplementedError

    def collapse_message(self, value: float, lr: float) -> tuple[str, str] | None:
        """`(kind, message)` when `collapse_metric` says the model collapsed, else None."""
        raise NotImplementedError

    def report(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, Figure | dict]:
        """Test-time artifacts by file name: figures (`.png`) and tables (`.json`)."""
        return {}

    def predict(self, outputs: np.ndarray) -> dict[str, np.ndarray]:
        """Prediction columns of a served model for raw outputs `(N, num_outputs)`: what users read."""
        raise NotImplementedError

    def prediction_columns(self) -> list[tuple[str, str]]:
        """`(name, type)` of `predict`'s columns, for the model signature."""
        raise NotImplementedError


def labels_digest(labels: np.ndarray) -> str:
    """A content digest of a split's targets (any task's shape), for cache keys."""
    array = np.ascontiguousarray(labels)
    return hashlib.sha256(f"{array.dtype}{array.shape}".encode() + array.tobytes()).hexdigest()
