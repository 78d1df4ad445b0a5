"""Training health: a run that diverges stops FAILED with a message that says what to change; a run that
collapses (what the task calls a collapse: one class for everything, no tag for anything, one value for every
example; or a training loss that never falls) is flagged loudly and tagged, so a broken run is never recorded as a
silent success."""

from __future__ import annotations

import logging
import math

import lightning.pytorch as pl
import torch
from torchmetrics import Metric

from src.schema import ConfigError
from src.tasks.base import Task

log = logging.getLogger(__name__)

COLLAPSE_TAG = "health"  # MLflow tag: "ok", or what went wrong


class Diverged(ConfigError):
    """Non-finite training loss: a user-fixable setting (the LR, most often), reported like any config error."""


class HealthCheck(pl.Callback):
    """Stops at the first non-finite training loss; after each validation, checks the task's collapse statistic
    (e.g. `val/majority_share`); at the end, whether the training loss fell at all."""

    def __init__(self, lr: float, task: Task) -> None:
        self.lr, self.task = lr, task
        self.train_losses: list[float] = []
        self.collapsed: tuple[str, str] | None = None  # (kind, message) at the latest validation
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
        value = trainer.callback_metrics.get(f"val/{self.task.collapse_metric}")
        if trainer.sanity_checking or value is None:
            return
        self.collapsed = self.task.collapse_message(float(value), self.lr)
        if self.collapsed is not None:
            log.warning("HEALTH WARNING at epoch %d: %s", trainer.current_epoch, self.collapsed[1])

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.collapsed is not None:
            kind, message = self.collapsed
            self._flag(kind, f"{message} (at the end of training)")
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
