"""Single-label classification: one class per example; softmax head, cross-entropy, accuracy/F1/AUROC."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn
from torchmetrics import AUROC, Accuracy, F1Score, MetricCollection, Precision, Recall
from torchmetrics.functional import confusion_matrix

from src.schema import ConfigError
from src.tasks.base import Cell, LabelFormat, Task, as_float, as_int, keep_valid, sorted_labels

ONE_CLASS_SHARE = 0.999  # share of validation predictions in one class that counts as a collapse


def classification_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """Accuracy, macro precision/recall/F1 and AUROC (binary or one-vs-rest macro), fed with probabilities."""
    common = {"task": "multiclass", "num_classes": num_classes}
    metrics = {
        "acc": Accuracy(**common),
        "precision": Precision(**common, average="macro"),
        "recall": Recall(**common, average="macro"),
        "f1": F1Score(**common, average="macro"),
        "auroc": AUROC(task="binary") if num_classes == 2 else AUROC(**common, average="macro"),
    }
    return MetricCollection(metrics, prefix=prefix)


def check_class_labels(labels: Sequence[str], where: str, column: str) -> None:
    """Refuse a label column that cannot be classes, before any compute: real numbers (a regression target such as
    STS-B's `score`, which would silently become hundreds of classes) or a distinct value on every row."""
    distinct = set(labels)
    numbers = [as_float(x) for x in distinct]
    if len(distinct) > 2 and all(x is not None for x in numbers):
        fractional = sum(not float(x).is_integer() for x in numbers)
        if fractional > len(distinct) / 2 or len(distinct) > max(50, len(labels) / 2):
            shown = ", ".join(sorted(distinct, key=lambda x: float(x))[:5])
            raise ConfigError(
                f"{where}: label_column {column!r} looks continuous: {len(distinct)} distinct numbers in "
                f"{len(labels)} rows ({shown}, ...), which a classifier would treat as that many classes; for a "
                "numeric target set task=regression (integer class ids: declare them with label_names)"
            )
    if len(labels) > 2 and len(distinct) == len(labels):
        raise ConfigError(
            f"{where}: label_column {column!r} has as many distinct values as rows ({len(labels)}): every row would "
            "be its own class; point label_column at the class column"
        )


class LabelIndex:
    """Label text -> index: by name when `names` are known (integers index them from `base`), else the sorted
    unique labels of the training table. Shared with multi-label tags."""

    def __init__(self, train_labels: Sequence[str], names: list[str] | None, base: int | None, key: str) -> None:
        self.base: int | None = None  # None: labels are names as written (no integer indices)
        self.named = False  # whether the names were given (label_names, the model's names) or read from train
        if names is None:
            self.names = sorted_labels(train_labels)
        else:
            self.names = names
            self.named = True
            ints = [n for n in map(as_int, set(train_labels) - set(names)) if n is not None]
            self.base = base if base is not None else (self._infer_base(ints, len(names), key) if ints else 0)
        self.by_name = {name: i for i, name in enumerate(self.names)}

    @staticmethod
    def _infer_base(ints: list[int], k: int, key: str) -> int:
        """The base under which more of the distinct integer labels name a class; a tie is ambiguous."""
        fits = [sum(base <= n < k + base for n in ints) for base in (0, 1)]
        if fits[0] == fits[1] > 0:
            raise ConfigError(
                f"label_base: the integer labels of {key} ({min(ints)}..{max(ints)}) index the {k} label_names "
                "either from 0 or from 1; set label_base: 0 or 1"
            )
        return int(fits[1] > fits[0])  # the labels outside the range are then reported as unknown

    def index(self, label: str) -> int:
        """The index of `label`, -1 when it is not one of the names."""
        i = self.by_name.get(label)
        if (
            i is None
            and self.base is not None
            and (n := as_int(label)) is not None
            and 0 <= n - self.base < len(self.names)
        ):
            i = n - self.base
        return -1 if i is None else i

    def describe(self) -> str:
        if self.base is None:
            return f"{'label_names' if self.named else 'train labels'}: {self.names}"
        k = len(self.names)
        return f"label_names: {self.names} (or their {self.base}-based indices {self.base}..{k - 1 + self.base})"


class ClassCodec:
    def __init__(self, cells: Sequence[Cell], fmt: LabelFormat, where: str) -> None:
        if fmt.names is None:  # classes come from the data: make sure they are classes
            check_class_labels(cells, where, fmt.columns[0])
        self.fmt, self.train = fmt, where
        self.index = LabelIndex(cells, fmt.names, fmt.base, where.split(":")[0])
        self.names = self.index.names

    def encode(self, cells: Sequence[Cell], lines: Sequence[int], where: str) -> tuple[np.ndarray, np.ndarray]:
        labels = np.array([self.index.index(label) for label in cells], dtype=np.int64)
        unknown = np.flatnonzero(labels < 0).tolist()
        if not unknown:
            return np.arange(len(labels)), labels
        values = sorted({cells[i] for i in unknown}, key=str)
        outside = "outside label_names" if self.index.named else f"that do not occur in {self.train}"
        what = f"label(s) {values} {outside}"
        rows = keep_valid(self.fmt, where, what, unknown, lines, len(labels), self.index.describe())
        return rows, labels[rows]


class Classification(Task):
    name = "classification"
    collapse_metric = "majority_share"

    def codec(self, cells: Sequence[Cell], fmt: LabelFormat, where: str) -> ClassCodec:
        if len(fmt.columns) != 1:
            raise ConfigError(
                f"label_column: task=classification reads one label column, got {fmt.columns}; several 0/1 columns "
                "are tags (task=multilabel), several number columns targets (task=regression)"
            )
        return ClassCodec(cells, fmt, where)

    def strata(self, targets: np.ndarray) -> np.ndarray:
        return targets

    def check_train(self, targets: np.ndarray, where: str) -> None:
        if len(self.names) < 2:
            raise ConfigError(
                f"{where}: the training data has {len(self.names)} class(es) {self.names}; a classifier needs at "
                "least 2 (check the label column)"
            )

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs, targets, label_smoothing=label_smoothing)

    def soft_targets(self, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(labels, self.num_outputs).float()

    def train_metrics(self) -> dict[str, Any]:
        return {"acc": Accuracy(task="multiclass", num_classes=self.num_outputs)}

    def evaluate(self, outputs: torch.Tensor, targets: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
        outputs, targets = outputs.float(), targets.long()
        probs = outputs.softmax(-1)
        metrics = classification_metrics(self.num_outputs, prefix).to(outputs.device)
        for name, metric in metrics.items():  # binary AUROC takes the positive class's probability
            metric.update(probs[:, 1] if name.endswith("auroc") and self.num_outputs == 2 else probs, targets)
        counts = torch.bincount(outputs.argmax(-1), minlength=self.num_outputs).float()
        return {
            **metrics.compute(),
            f"{prefix}loss": nn.functional.cross_entropy(outputs, targets),
            # The largest share of predictions in one class: 1.0 means a collapsed model (src.health).
            f"{prefix}majority_share": counts.max() / counts.sum().clamp(min=1),
        }

    def collapse_message(self, value: float, lr: float) -> tuple[str, str] | None:
        if value < ONE_CLASS_SHARE:
            return None
        return (
            "one_class",
            f"the model predicts one class for {value:.1%} of the validation set: it collapsed; try a lower optim.lr "
            f"(now {lr:g}) or check the labels",
        )

    def report(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, Figure | dict]:
        from src.tracking.plots import confusion_matrix_figure

        matrix = confusion_matrix(outputs.argmax(-1), targets.long(), task="multiclass", num_classes=self.num_outputs)
        return {"confusion_matrix.png": confusion_matrix_figure(matrix.cpu().numpy(), self.names)}

    def predict(self, outputs: np.ndarray) -> dict[str, np.ndarray]:
        shifted = np.exp(outputs - outputs.max(-1, keepdims=True))
        probs = shifted / shifted.sum(-1, keepdims=True)
        names = np.asarray(self.names, dtype=object)
        return {"label": names[probs.argmax(-1)], **{f"prob_{n}": probs[:, i] for i, n in enumerate(self.names)}}

    def prediction_columns(self) -> list[tuple[str, str]]:
        return [("label", "string"), *((f"prob_{n}", "double") for n in self.names)]
