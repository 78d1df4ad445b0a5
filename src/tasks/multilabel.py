"""Multi-label: any number of tags per example (none included); one sigmoid per tag, binary cross-entropy, F1
micro/macro, mAP, subset accuracy and Hamming loss at a decision threshold (0.5, or tuned per tag on validation
and then stored with the model)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn
from torchmetrics.functional.classification import (
    multilabel_average_precision,
    multilabel_exact_match,
    multilabel_f1_score,
    multilabel_hamming_distance,
)

from src.schema import ConfigError
from src.tasks.base import Cell, LabelFormat, Task, as_float, keep_valid
from src.tasks.classification import LabelIndex
from src.tasks.config import MultilabelConfig

NO_LABEL_SHARE = 0.99  # share of validation examples without any predicted tag that counts as a collapse
THRESHOLD_GRID = np.round(np.arange(0.05, 0.951, 0.05), 2)
MAX_POS_WEIGHT = 100.0  # a tag seen once in 10k examples would otherwise weigh 10k: unstable
OTHER_SEPARATORS = (",", ";", "|", " ")


def tags_of(cell: Any, separator: str | None) -> list[str] | None:
    """One cell's tags: a JSON list (`["joy", "love"]`, `[8, 20]`), else split on `separator`; None: unparseable."""
    if cell is None or cell == "":
        return []
    text = str(cell).strip()
    if text.startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError:
            return None
        return [str(v).strip() for v in values] if isinstance(values, list) else None
    if separator is None:
        return None
    return [t.strip() for t in text.split(separator) if t.strip()]


def binary(value: Any) -> int | None:
    """A 0/1 indicator cell (`1`, `0.0`, `true`) as 0 or 1; None: another value."""
    text = str(value).strip().lower() if value is not None else ""
    if text in ("true", "false"):
        return int(text == "true")
    number = as_float(text)
    return int(number) if number in (0.0, 1.0) else None


class TagCodec:
    """One column of tag lists (separator or JSON), or several 0/1 indicator columns (one per tag)."""

    def __init__(self, cells: Sequence[Cell], fmt: LabelFormat, where: str) -> None:
        self.fmt, self.where = fmt, where
        if len(fmt.columns) > 1:
            if fmt.names is not None and len(fmt.names) != len(fmt.columns):
                raise ConfigError(
                    f"label_names: {len(fmt.names)} names for {len(fmt.columns)} indicator columns {fmt.columns}"
                )
            self.index = None
            self.names = list(fmt.names or fmt.columns)
            return
        parsed = [tags_of(c, fmt.separator) for c in cells]
        if fmt.separator is None and any(p is None for p in parsed):
            raise ConfigError(
                f"label_separator: {where}: label_column {fmt.columns[0]!r} holds tags that are not JSON lists "
                f"(e.g. {next(c for c, p in zip(cells, parsed, strict=True) if p is None)!r}); set "
                "data.label_separator to the character between tags, e.g. ','"
            )
        texts = [str(c) for c in cells if c]
        if fmt.separator is not None and texts and not any(fmt.separator in t for t in texts):
            seen = [s for s in OTHER_SEPARATORS if s != fmt.separator and any(s in t for t in texts)]
            if seen:
                raise ConfigError(
                    f"label_separator: {fmt.separator!r} occurs in no label of {where}, but {seen[0]!r} does "
                    f"(e.g. {next(t for t in texts if seen[0] in t)!r}); set data.label_separator={seen[0]!r}"
                )
        self.index = LabelIndex([t for tags in parsed if tags for t in tags], fmt.names, fmt.base, where.split(":")[0])
        self.names = self.index.names

    def encode(self, cells: Sequence[Cell], lines: Sequence[int], where: str) -> tuple[np.ndarray, np.ndarray]:
        targets = np.zeros((len(cells), len(self.names)), dtype=np.float32)
        bad: dict[int, str] = {}
        for row, cell in enumerate(cells):
            if self.index is None:  # indicator columns
                values = [binary(v) for v in cell]
                if None in values:
                    column = self.fmt.columns[values.index(None)]
                    bad[row] = f"column {column!r} holds {cell[values.index(None)]!r}, not 0/1"
                else:
                    targets[row] = values
                continue
            tags = tags_of(cell, self.fmt.separator)
            if tags is None:
                bad[row] = f"{cell!r} is not a tag list"
                continue
            ids = [self.index.index(t) for t in tags]
            if -1 in ids:
                bad[row] = f"unknown tag {tags[ids.index(-1)]!r}"
                continue
            targets[row, ids] = 1.0
        if not bad:
            return np.arange(len(cells)), targets
        first = next(iter(bad.values()))
        known = "" if self.index is None else self.index.describe()
        what = f"{len(bad)} row(s) with invalid labels, e.g. {first}"
        rows = keep_valid(self.fmt, where, what, list(bad), lines, len(cells), known)
        return rows, targets[rows]


class Multilabel(Task):
    name = "multilabel"
    empty_label = True
    collapse_metric = "no_label_share"
    cfg: MultilabelConfig

    def codec(self, cells: Sequence[Cell], fmt: LabelFormat, where: str) -> TagCodec:
        return TagCodec(cells, fmt, where)

    def strata(self, targets: np.ndarray) -> np.ndarray:
        """Each example's rarest tag (-1: none), so every tag, rare ones first, lands on both sides of a split."""
        frequency = targets.sum(0)
        rank = np.where(targets > 0, frequency[None, :], np.inf)
        return np.where(targets.any(1), rank.argmin(1), -1)

    def check_train(self, targets: np.ndarray, where: str) -> None:
        if len(self.names) < 1 or not targets.any():
            raise ConfigError(f"{where}: no example has a tag; check label_column and label_separator")

    def bind(self, names: list[str], train_targets: np.ndarray | None) -> None:
        super().bind(names, train_targets)
        k = len(names)
        threshold = 0.5 if self.cfg.tuned else float(self.cfg.threshold)
        self.register_buffer("thresholds", torch.full((k,), threshold))
        weight = torch.ones(k)
        if self.cfg.pos_weight and train_targets is not None:
            positives = torch.as_tensor(train_targets.sum(0))
            weight = ((len(train_targets) - positives) / positives.clamp(min=1)).clamp(1.0, MAX_POS_WEIGHT)
        self.register_buffer("pos_weight", weight.float())

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        targets = targets.to(outputs.dtype)
        if label_smoothing:
            targets = targets * (1 - label_smoothing) + label_smoothing / 2
        weight = self.pos_weight.to(outputs.dtype) if self.cfg.pos_weight else None
        return nn.functional.binary_cross_entropy_with_logits(outputs, targets, pos_weight=weight)

    def on_validation(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """With `threshold: tune`, each tag's threshold maximises its F1 on this validation pass; a checkpoint
        keeps the thresholds of its own epoch. Tags without a validation positive keep 0.5."""
        if not self.cfg.tuned:
            return
        probs, truth = outputs.float().sigmoid(), targets.bool()
        grid = torch.as_tensor(THRESHOLD_GRID, device=probs.device, dtype=probs.dtype)
        predicted = probs[None] >= grid[:, None, None]  # (T, N, K)
        tp = (predicted & truth).sum(1).float()
        f1 = 2 * tp / (predicted.sum(1) + truth.sum(0)).clamp(min=1)  # (T, K)
        best = grid[f1.argmax(0)]
        self.thresholds.copy_(torch.where(truth.any(0), best, torch.full_like(best, 0.5)))

    def decide(self, probs: torch.Tensor) -> torch.Tensor:
        return (probs >= self.thresholds.to(probs.device)).long()

    def evaluate(self, outputs: torch.Tensor, targets: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
        outputs, truth = outputs.float(), targets.long()
        probs = outputs.sigmoid()
        predicted = self.decide(probs)
        k = self.num_outputs
        return {
            f"{prefix}micro_f1": multilabel_f1_score(predicted, truth, k, average="micro"),
            f"{prefix}macro_f1": multilabel_f1_score(predicted, truth, k, average="macro"),
            f"{prefix}map": multilabel_average_precision(probs, truth, k, average="macro"),
            f"{prefix}subset_acc": multilabel_exact_match(predicted, truth, k),
            f"{prefix}hamming": multilabel_hamming_distance(predicted, truth, k),
            f"{prefix}loss": nn.functional.binary_cross_entropy_with_logits(outputs, targets.float()),
            f"{prefix}no_label_share": (predicted.sum(1) == 0).float().mean(),
        }

    def collapse_message(self, value: float, lr: float) -> tuple[str, str] | None:
        if value < NO_LABEL_SHARE:
            return None
        return (
            "no_label",
            f"the model predicts no tag for {value:.1%} of the validation set: it collapsed to the empty set; try "
            f"task.threshold=tune, task.pos_weight=true or another optim.lr (now {lr:g})",
        )

    def report(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, Figure | dict]:
        """Per-tag F1, support and threshold: where the macro average comes from."""
        predicted, truth = self.decide(outputs.float().sigmoid()), targets.long()
        f1 = multilabel_f1_score(predicted, truth, self.num_outputs, average="none")
        support = truth.sum(0)
        table = {
            name: {"f1": float(f1[i]), "support": int(support[i]), "threshold": float(self.thresholds[i])}
            for i, name in enumerate(self.names)
        }
        return {"per_label_f1.json": table}

    def predict(self, outputs: np.ndarray) -> dict[str, np.ndarray]:
        probs = 1 / (1 + np.exp(-outputs))
        chosen = probs >= self.thresholds.cpu().numpy()
        names = np.asarray(self.names, dtype=object)
        labels = np.array([json.dumps(list(names[row])) for row in chosen], dtype=object)
        return {"labels": labels, **{f"prob_{n}": probs[:, i] for i, n in enumerate(self.names)}}

    def prediction_columns(self) -> list[tuple[str, str]]:
        return [("labels", "string"), *((f"prob_{n}", "double") for n in self.names)]
