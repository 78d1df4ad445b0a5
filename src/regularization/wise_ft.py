"""WiSE-FT (Wortsman et al. 2022): evaluate (1 - alpha) * pretrained + alpha * fine-tuned backbone weights."""

from __future__ import annotations

import lightning.pytorch as pl

from src.regularization.reference import PretrainedReference


class WiseFT(pl.Callback):
    """Interpolates the backbone (the head is new, it has no pretrained weights) when testing starts, i.e. after
    the best checkpoint is loaded; the logged checkpoint then holds the interpolated weights that were tested.
    """

    def __init__(self, reference: PretrainedReference, alpha: float) -> None:
        self.reference, self.alpha = reference, alpha

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.reference.interpolate(pl_module.backbone, self.alpha)
