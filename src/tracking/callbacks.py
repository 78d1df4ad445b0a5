"""Per-epoch logging of the transfer-specific state: the LR of every layer group, trainable parameters."""

from __future__ import annotations

import lightning.pytorch as pl

from src.finetune.strategy import count_trainable


class TrainingStateLogger(pl.Callback):
    """Logs `lr-group-<i>` (i = layer group, head last) and `trainable_params` at each epoch start."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        lrs: dict[str, float] = {}
        for group in trainer.optimizers[0].param_groups:
            lrs.setdefault(f"lr-group-{group['layer_group']}", group["lr"])
        metrics = {**lrs, "trainable_params": float(count_trainable(pl_module))}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.current_epoch)
