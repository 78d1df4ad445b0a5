"""TransferModule: backbone + new head, trained by Lightning. No config plumbing lives here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics import ConfusionMatrix

from src.backbones.base import Backbone
from src.metrics import classification_metrics, update


class ClassifierHead(nn.Sequential):
    """The new task head: dropout + linear on the backbone's pooled features."""

    def __init__(self, feature_dim: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))


Batch = dict[str, torch.Tensor]
BatchTransform = Callable[[Batch], Batch]


class LossTerm(Protocol):
    """An extra training-loss term (L2-SP, distillation KL), logged as `train/<name>`."""

    name: str

    def __call__(self, module: TransferModule, batch: Batch, logits: torch.Tensor) -> torch.Tensor: ...


class TransferModule(pl.LightningModule):
    """Classifies with `head(backbone(batch))`.

    `configure_optim` builds the optimizer/scheduler (see `src.optim`). Training only: `batch_transforms`
    (augmentation, mixup) rewrite the batch first and may add `soft_labels` (B, C) probabilities, which then
    replace `labels` as cross-entropy targets; the loss is `ce_weight * CE + sum(loss_terms)`.
    """

    def __init__(
        self,
        backbone: Backbone,
        head: nn.Module,
        num_classes: int,
        configure_optim: Callable[[TransferModule], dict],
        label_smoothing: float = 0.0,
        batch_transforms: list[BatchTransform] | None = None,
        loss_terms: list[LossTerm] | None = None,
        ce_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.num_classes = num_classes
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self._configure_optim = configure_optim
        self.batch_transforms = batch_transforms or []
        self.loss_terms = loss_terms or []
        self.ce_weight = ce_weight
        self.train_acc = classification_metrics(num_classes, "train/")["acc"]
        self.val_metrics = classification_metrics(num_classes, "val/")
        self.test_metrics = classification_metrics(num_classes, "test/")
        self.confusion = ConfusionMatrix(task="multiclass", num_classes=num_classes)
        self.register_buffer("val_predicted", torch.zeros(num_classes, dtype=torch.long), persistent=False)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.backbone(batch))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        for transform in self.batch_transforms:
            batch = transform(batch)
        logits = self(batch)
        n = len(batch["labels"])
        loss = self.ce_weight * self.criterion(logits, batch.get("soft_labels", batch["labels"]))
        for term in self.loss_terms:
            value = term(self, batch, logits)
            self.log(f"train/{term.name}", value, on_step=False, on_epoch=True, batch_size=n)
            loss = loss + value
        self.train_acc(logits.argmax(-1), batch["labels"])
        self.log("loss", loss, prog_bar=True, logger=False)
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=n)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        logits = self(batch)
        loss = nn.functional.cross_entropy(logits, batch["labels"])
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", batch_size=len(batch["labels"]))
        return logits

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self._eval_step(batch, "val")
        update(self.val_metrics, logits, batch["labels"])
        self.val_predicted += torch.bincount(logits.argmax(-1), minlength=self.num_classes)

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), prog_bar=False)
        self.val_metrics.reset()
        # The largest share of validation predictions in one class: 1.0 means a collapsed model (src.health).
        counts = self.val_predicted.float()
        self.log("val/majority_share", counts.max() / counts.sum().clamp(min=1), sync_dist=True)
        self.val_predicted.zero_()

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self._eval_step(batch, "test")
        update(self.test_metrics, logits, batch["labels"])
        self.confusion.update(logits.argmax(-1), batch["labels"])

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute())
        self.test_metrics.reset()

    def configure_optimizers(self) -> dict:
        return self._configure_optim(self)
