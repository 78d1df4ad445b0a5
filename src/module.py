"""TransferModule: backbone + new head, trained by Lightning. No config plumbing lives here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics import ConfusionMatrix, MeanMetric

from src.backbones.base import Backbone
from src.metrics import classification_metrics, update


class ClassifierHead(nn.Sequential):
    """The new task head: dropout + linear on the backbone's pooled features."""

    def __init__(self, feature_dim: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))


Batch = dict[str, torch.Tensor]
# Batch keys the feature cache (src.features) fills from disk: the output of the backbone's frozen leading layer
# groups (a tensor, or a dict for text), and a frozen distillation teacher's logits.
FROZEN = "frozen"
TEACHER_LOGITS = "teacher_logits"
BatchTransform = Callable[[Batch], Batch]


class LossTerm(Protocol):
    """An extra training-loss term (L2-SP, distillation KL), logged as `train/<name>`."""

    name: str

    def __call__(self, module: TransferModule, batch: Batch, logits: torch.Tensor) -> torch.Tensor: ...


def concat_inputs(a: Batch, b: Batch) -> Batch:
    """The model inputs both batches have (labels excluded), stacked; token sequences right-padded with 0 (their
    attention mask is 0 there) to a common length."""
    out = {}
    for key in a.keys() & b.keys() - {"labels", "soft_labels"}:
        x, y = a[key], b[key]
        if x.ndim == 2 and x.shape[1] != y.shape[1]:
            width = max(x.shape[1], y.shape[1])
            x, y = (nn.functional.pad(t, (0, width - t.shape[1])) for t in (x, y))
        out[key] = torch.cat([x, y])
    return out


class TransferModule(pl.LightningModule):
    """Classifies with `head(backbone(batch))`.

    `configure_optim` builds the optimizer/scheduler (see `src.optim`). Training only: `batch_transforms`
    (augmentation, mixup) rewrite the batch first and may add `soft_labels` (B, C) probabilities, which then
    replace `labels` as cross-entropy targets; the loss is `ce_weight * CE + sum(loss_terms)`.

    Domain adaptation: a training batch `{"source": ..., "target": ...}` (unlabelled target inputs) is one forward
    pass over both domains, so batch norm normalises them together; the source features go to `batch["features"]`
    and the target's features and logits to `batch["target"]` for the adaptation loss terms. `aux_modules`
    (domain discriminators) are trained with the head.
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
        aux_modules: list[nn.Module] | None = None,
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
        self.aux_modules = nn.ModuleList(aux_modules or [])
        # Epoch means accumulated here and logged once per epoch: a `self.log` per step costs more than a
        # cached linear probe's whole step.
        self.train_acc = classification_metrics(num_classes, "train/")["acc"]
        self.train_loss = MeanMetric()
        self.val_metrics = classification_metrics(num_classes, "val/")
        self.test_metrics = classification_metrics(num_classes, "test/")
        self.confusion = ConfusionMatrix(task="multiclass", num_classes=num_classes)
        self.register_buffer("val_predicted", torch.zeros(num_classes, dtype=torch.long), persistent=False)

        # Set by the feature cache: batches may carry what the first `frozen_cut` layer groups output (FROZEN);
        # `use_frozen` says whether that applies now (False in epochs where those groups train).
        self.frozen_cut: int | None = None
        self.use_frozen = False

    def features(self, batch: Batch, use_frozen: bool | None = None) -> torch.Tensor:
        """The backbone's features: only the layer groups after the cut run when the batch carries the cached
        output of the frozen ones and it applies (`use_frozen`, default: the module's current setting)."""
        if FROZEN in batch and (self.use_frozen if use_frozen is None else use_frozen):
            return self.backbone.forward_from(self.frozen_cut, batch[FROZEN])
        return self.backbone(batch)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.features(batch))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if "source" in batch:
            batch = {**batch["source"], "target": batch["target"]}
        for transform in self.batch_transforms:
            batch = transform(batch)
        logits = self(batch) if "target" not in batch else self._joint_forward(batch)
        n = len(batch["labels"])
        ce = self.criterion(logits, batch.get("soft_labels", batch["labels"]))
        loss = self.ce_weight * ce
        if self.loss_terms:
            self.log("train/ce", ce, on_step=False, on_epoch=True, batch_size=n)
        for term in self.loss_terms:
            value = term(self, batch, logits)
            self.log(f"train/{term.name}", value, on_step=False, on_epoch=True, batch_size=n)
            loss = loss + value
        self.train_acc.update(logits.argmax(-1), batch["labels"])
        self.train_loss.update(loss.detach(), n)
        if self.trainer.progress_bar_callback is not None:
            self.log("loss", loss, prog_bar=True, logger=False)
        return loss

    def on_train_epoch_end(self) -> None:
        if self.train_loss.update_count:  # an epoch may end without a step (resumed at its end, limit 0)
            self.log_dict({"train/loss": self.train_loss.compute(), "train/acc": self.train_acc.compute()})
        self.train_loss.reset()
        self.train_acc.reset()

    def _joint_forward(self, batch: dict) -> torch.Tensor:
        """Source logits of one forward pass over source + target inputs (see the class docstring)."""
        target, n = batch["target"], len(batch["labels"])
        features = self.backbone(concat_inputs(batch, target))
        logits = self.head(features)
        batch["features"], target["features"], target["logits"] = features[:n], features[n:], logits[n:]
        return logits[:n]

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
