"""Exponential moving average of the weights, used for validation, checkpoints and therefore test."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn

from src.schema import check


@dataclass
class EMAConfig:
    decay: float | None = None  # EMA decay per optimizer step, e.g. 0.99; null = off
    start_step: int = 0  # first optimizer step averaged (validation before it sees the initial weights)
    every_n_steps: int = 1  # update the average every n optimizer steps

    def __post_init__(self) -> None:
        check(self.decay is None or 0 < self.decay < 1, f"ema.decay: must be in (0, 1) or null; got {self.decay}")
        check(self.start_step >= 0, f"ema.start_step: must be >= 0; got {self.start_step}")
        check(self.every_n_steps >= 1, f"ema.every_n_steps: must be >= 1; got {self.every_n_steps}")


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
