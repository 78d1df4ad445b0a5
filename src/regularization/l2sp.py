"""L2-SP (Li et al. 2018): keep the fine-tuned backbone close to its pretrained weights, shrink the new head.

Loss term `alpha * ||w - w0||^2` over the backbone + `beta * ||w||^2` over the head (no 1/2 factor). With
alpha > 0 the backbone's weight decay towards 0 is switched off by default (`keep_weight_decay: false`), as in the
paper, where L2-SP *replaces* plain decay on the pretrained layers: decaying towards 0 fights the pull towards w0.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from src.regularization.reference import PretrainedReference


class L2SP:
    """The penalty as a `TransferModule` loss term (logged as `train/l2_sp`)."""

    name = "l2_sp"

    def __init__(self, reference: PretrainedReference, alpha: float, beta: float) -> None:
        self.reference, self.alpha, self.beta = reference, alpha, beta

    def __call__(self, module: pl.LightningModule, batch: dict, logits: torch.Tensor) -> torch.Tensor:
        penalty = logits.new_zeros(())
        if self.alpha:
            drift = sum(((p - p0) ** 2).sum() for p, p0 in self.reference.param_pairs() if p.requires_grad)
            penalty = penalty + self.alpha * drift
        if self.beta:
            penalty = penalty + self.beta * sum((p**2).sum() for p in module.head.parameters())
        return penalty


class NoBackboneWeightDecay(pl.Callback):
    """Zero the weight decay of the backbone's optimizer groups once they exist (the head keeps its decay).

    Acting on the built optimizer (tagged `layer_group`, head = the last index) keeps `src.optim` unaware of
    L2-SP; a resumed optimizer already carries the zeros.
    """

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        head = len(pl_module.backbone.layer_groups())
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                if group["layer_group"] < head:
                    group["weight_decay"] = 0.0
