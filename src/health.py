"""Training health: a run that diverges stops FAILED with a message that says what to change; a run that
collapses (one class predicted for everything, or a training loss that never falls) is flagged loudly and tagged,
so a broken run is never recorded as a silent success."""

from __future__ import annotations

import logging
import math

import lightning.pytorch as pl
import torch
from torchmetrics import Metric

from src.schema import ConfigError

log = logging.getLogger(__name__)

COLLAPSE_TAG = "health"  # MLflow tag: "ok", or what went wrong
ONE_CLASS_SHARE = 0.999  # share of validation predictions in one class that counts as a collapse


class Diverged(ConfigError):
    """Non-finite training loss: a user-fixable setting (the LR, most often), reported like any config error."""


class HealthCheck(pl.Callback):
    """Stops at the first non-finite training loss; after each validation, checks the predicted-class shares
    (`val/majority_share`, logged by `TransferModule`); at the end, whether the training loss fell at all."""

    def __init__(self, lr: float) -> None:
        self.lr = lr
        self.train_losses: list[float] = []
        self.majority_share: float | None = None  # at the latest validation
        self.problems: dict[str, str] = {}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        # Reading the flag waits for the accelerator: on a GPU, check at the logging interval only.
        if loss.device.type != "cpu" and trainer.global_step % max(1, trainer.log_every_n_steps):
            return
        if not torch.isfinite(loss).all():
            raise Diverged(
                f"training loss is {loss.item()} at epoch {trainer.current_epoch}, step {trainer.global_step} "
                f"(batch {batch_idx}): training diverged; lower optim.lr (now {self.lr:g}, try {self.lr / 10:g}) "
                "or keep trainer.gradient_clip_val set"
            )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The module's running epoch mean (it logs `train/loss` only after the callbacks' epoch-end hooks).
        loss = getattr(pl_module, "train_loss", None)
        if isinstance(loss, Metric) and loss.update_count:
            self.train_losses.append(float(loss.compute()))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        share = trainer.callback_metrics.get("val/majority_share")
        if trainer.sanity_checking or share is None:
            return
        self.majority_share = float(share)
        if self.majority_share >= ONE_CLASS_SHARE:
            log.warning(
                "HEALTH WARNING: validation predictions are all one class at epoch %d (majority share %.3f)",
                trainer.current_epoch,
                self.majority_share,
            )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.majority_share is not None and self.majority_share >= ONE_CLASS_SHARE:
            self._flag(
                "one_class",
                f"the model predicts one class for {self.majority_share:.1%} of the validation set at the end of "
                f"training: it collapsed; try a lower optim.lr (now {self.lr:g}) or check the labels",
            )
        losses = self.train_losses
        if len(losses) >= 3 and not min(losses[1:]) < losses[0] and all(math.isfinite(x) for x in losses):
            self._flag(
                "loss_flat",
                f"training loss never fell below its first epoch's ({losses[0]:.4f}) in {len(losses)} epochs: "
                f"nothing was learned; check optim.lr (now {self.lr:g}) and the trainable layer groups",
            )

    def _flag(self, kind: str, message: str) -> None:
        self.problems[kind] = message
        log.warning("HEALTH WARNING: %s", message)

    def tags(self) -> dict[str, str]:
        """`health`: ok or the problem kinds; `health.<kind>`: each message."""
        if not self.problems:
            return {COLLAPSE_TAG: "ok"}
        return {COLLAPSE_TAG: ",".join(sorted(self.problems)), **{f"health.{k}": v for k, v in self.problems.items()}}
