"""Exponential moving average of the weights, used for validation, checkpoints and therefore test."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn

from src.regularization.config import EMAConfig


class EMA(EMAWeightAveraging):
    """Lightning's EMA callback: validation swaps the averaged weights in, and checkpoints store them as the
    `state_dict`, so `trainer.test(ckpt_path=best)` and the logged checkpoint hold the EMA weights.

    Lightning also restores the raw weights kept in the checkpoint on *every* load while the average exists,
    which would make the test after `fit` evaluate the raw weights; only a resumed fit needs them.
    """

    def __init__(self, cfg: EMAConfig) -> None:
        super().__init__(
            decay=cfg.decay, update_starting_at_step=cfg.start_step, update_every_n_steps=cfg.every_n_steps
        )

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
