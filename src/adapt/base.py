"""The adaptation contract: what a method adds to a run, and the checks that need the whole config.

A method is a set of extension points the run already has: loss terms (`TransferModule.loss_terms`) computed on
the source and target features/logits of one joint forward pass, trainable auxiliary modules (domain
discriminators, optimised with the head), and the role the target domain plays in the data module's loaders.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
from torch import nn

from src.adapt.config import AdaptConfig
from src.module import LossTerm


def ramp(progress: float) -> float:
    """Ganin et al.'s schedule 2/(1+exp(-10p)) - 1: 0 at the start, ~1 after half of training."""
    return 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0


def progress(module: pl.LightningModule) -> float:
    """Fraction of the fit's optimizer steps done."""
    total = module.trainer.estimated_stepping_batches
    return min(1.0, module.global_step / total) if math.isfinite(total) and total > 0 else 1.0


class Adapter:
    """`none`: no adaptation; the target domain, if the data has one, is only evaluated."""

    target_role = "eval"  # see src.data.common.TARGET_ROLES
    aligns_features = False  # the loss acts on backbone features, so the backbone must train (not a linear probe)

    def __init__(self, cfg: AdaptConfig, feature_dim: int, num_classes: int) -> None:
        self.cfg = cfg
        self.feature_dim, self.num_classes = feature_dim, num_classes

    def weight(self, module: pl.LightningModule) -> float:
        return self.cfg.weight * (ramp(progress(module)) if self.cfg.ramp else 1.0)

    def loss_terms(self) -> list[LossTerm]:
        return []

    def modules(self) -> list[nn.Module]:
        """Trainable auxiliary modules (domain discriminators); the module registers and optimises them."""
        return [term for term in self.loss_terms() if isinstance(term, nn.Module)]
