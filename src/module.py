"""TransferModule: backbone + new head, trained by Lightning for the run's task. No config plumbing lives here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics import CatMetric, MeanMetric, MetricCollection

from src.backbones.base import Backbone
from src.optim import clip_gradients
from src.tasks.base import Task

# A checkpoint's list of the state entries it leaves out (`TransferModule.fixed_state`).
OMITTED_STATE = "omitted_state"


def load_part(module: nn.Module, checkpoint: dict, prefix: str) -> None:
    """Load a checkpoint's `<prefix>.*` weights into `module`, strictly but for the entries the checkpoint left out
    (unchanged since built, see `TransferModule.fixed_state`): for those the module's own weights stand, so it must
    hold what the run started from (its pretrained backbone, or the run's own model)."""
    start = prefix + "."
    state = {k[len(start) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(start)}
    omitted = {k[len(start) :] for k in checkpoint.get(OMITTED_STATE, []) if k.startswith(start)}
    missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected or set(missing) - omitted:
        raise RuntimeError(
            f"Error(s) in loading state_dict for {type(module).__name__}: missing {sorted(set(missing) - omitted)}, "
            f"unexpected {sorted(unexpected)}"
        )


class Head(nn.Sequential):
    """The new task head: dropout + linear on the backbone's pooled features, one output per class, tag or
    target (the task decides what they mean)."""

    def __init__(self, feature_dim: int, num_outputs: int, dropout: float = 0.0) -> None:
        super().__init__(nn.Dropout(dropout), nn.Linear(feature_dim, num_outputs))


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
    """Predicts `head(backbone(batch))`; the task (`src.tasks`) says what the outputs mean: its loss, metrics and
    health statistics.

    `configure_optim` builds the optimizer/scheduler (see `src.optim`). Training only: `batch_transforms`
    (augmentation, mixup) rewrite the batch first and may add `soft_labels` (B, outputs) mixed targets, which then
    replace `labels` as the task loss's targets; the loss is `ce_weight * task loss + sum(loss_terms)`. Validation
    and test collect every output of the pass and score them at its end, so metrics that need the whole split
    (Spearman, mAP, tuned thresholds) are exact.

    Domain adaptation: a training batch `{"source": ..., "target": ...}` (unlabelled target inputs) is one forward
    pass over both domains, so batch norm normalises them together; the source features go to `batch["features"]`
    and the target's features and logits to `batch["target"]` for the adaptation loss terms. `aux_modules`
    (domain discriminators) are trained with the head.
    """

    def __init__(
        self,
        backbone: Backbone,
        head: nn.Module,
        task: Task,
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
        self.task = task
        self.label_smoothing = label_smoothing
        self._configure_optim = configure_optim
        self.batch_transforms = batch_transforms or []
        self.loss_terms = loss_terms or []
        self.ce_weight = ce_weight
        self.aux_modules = nn.ModuleList(aux_modules or [])
        # Epoch means accumulated here and logged once per epoch: a `self.log` per step costs more than a
        # cached linear probe's whole step.
        self.train_metrics = MetricCollection(task.train_metrics(), prefix="train/")
        self.train_loss = MeanMetric()
        # Each evaluation pass's outputs and targets (synchronised across processes), scored at its end.
        self.outputs, self.targets = CatMetric(nan_strategy="disable"), CatMetric(nan_strategy="disable")
        self.test_outputs: tuple[torch.Tensor, torch.Tensor] | None = None  # the last test pass, for its report

        # Set by the feature cache: batches may carry what the first `frozen_cut` layer groups output (FROZEN);
        # `use_frozen` says whether that applies now (False in epochs where those groups train).
        self.frozen_cut: int | None = None
        self.use_frozen = False
        # State entries no epoch changes (src.features.fixed_state): left out of checkpoints, restored from the module
        # itself on load. A linear probe's checkpoint is then its head, not a 90 MB copy of the pretrained encoder
        # written at every improving epoch and read back for the test.
        self.fixed_state: set[str] = set()

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
        ce = self.task.loss(logits, batch.get("soft_labels", batch["labels"]), self.label_smoothing)
        loss = self.ce_weight * ce
        if self.loss_terms:
            self.log("train/ce", ce, on_step=False, on_epoch=True, batch_size=n)
        for term in self.loss_terms:
            value = term(self, batch, logits)
            self.log(f"train/{term.name}", value, on_step=False, on_epoch=True, batch_size=n)
            loss = loss + value
        if self.train_metrics:
            self.train_metrics.update(logits.detach(), batch["labels"])
        self.train_loss.update(loss.detach(), n)
        if self.trainer.progress_bar_callback is not None:
            self.log("loss", loss, prog_bar=True, logger=False)
        return loss

    def on_train_epoch_end(self) -> None:
        if self.train_loss.update_count:  # an epoch may end without a step (resumed at its end, limit 0)
            self.log_dict({"train/loss": self.train_loss.compute(), **self.train_metrics.compute()})
        self.train_loss.reset()
        self.train_metrics.reset()

    def _joint_forward(self, batch: dict) -> torch.Tensor:
        """Source logits of one forward pass over source + target inputs (see the class docstring)."""
        target, n = batch["target"], len(batch["labels"])
        features = self.backbone(concat_inputs(batch, target))
        logits = self.head(features)
        batch["features"], target["features"], target["logits"] = features[:n], features[n:], logits[n:]
        return logits[:n]

    def _eval_step(self, batch: dict[str, torch.Tensor]) -> None:
        self.outputs.update(self(batch).float())
        self.targets.update(batch["labels"])

    def _pass(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The pass's outputs and targets (float: the task casts class indices back), all of them (every
        process's), and reset for the next pass."""
        outputs, targets = self.outputs.compute(), self.targets.compute()
        self.outputs.reset()
        self.targets.reset()
        return outputs, targets

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        if not self.outputs.update_count:
            return
        outputs, targets = self._pass()
        self.task.on_validation(outputs, targets)  # e.g. tunes thresholds, then scored with them
        metrics = self.task.evaluate(outputs, targets, "val/")
        self.log("val/loss", metrics.pop("val/loss"), prog_bar=True)
        self.log_dict(metrics)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        if not self.outputs.update_count:
            return
        self.test_outputs = self._pass()
        self.log_dict(self.task.evaluate(*self.test_outputs, "test/"))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        for key in self.fixed_state:
            state.pop(key, None)
        checkpoint[OMITTED_STATE] = sorted(self.fixed_state)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """The entries the checkpoint left out are those the module holds as built (what a resumed or tested run
        rebuilds: the pretrained weights of groups that stayed frozen)."""
        current = self.state_dict()
        state = checkpoint["state_dict"]
        for key in checkpoint.get(OMITTED_STATE, []):
            state.setdefault(key, current[key])

    def configure_optimizers(self) -> dict:
        return self._configure_optim(self)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's clipping, but clipping bf16 gradients of a fused optimizer too (`src.optim.clip_gradients`)."""
        clip_gradients(self, optimizer, gradient_clip_val or 0.0, gradient_clip_algorithm or "norm")
