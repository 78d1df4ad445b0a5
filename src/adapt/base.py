"""The adaptation contract: what a method adds to a run, and the checks that need the whole config.

A method is a set of extension points the run already has: loss terms (`TransferModule.loss_terms`) computed on
the source and target features/logits of one joint forward pass, trainable auxiliary modules (domain
discriminators, optimised with the head), and the role the target domain plays in the data module's loaders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
from torch import nn

from src.module import LossTerm
from src.registry import Registry
from src.schema import check


@dataclass
class AdaptConfig:
    """`none` and `oracle` have no knobs."""

    name: str = "none"


@dataclass
class WeightedConfig(AdaptConfig):
    """Fields every adaptation method has. The loss weight is `weight * ramp(p)`, p = training progress in [0, 1]."""

    weight: float = 1.0  # trade-off of the adaptation loss against the source cross-entropy
    ramp: bool = True  # ramp the weight (adversarial methods: the gradient reversal) up as 2/(1+exp(-10p)) - 1

    def __post_init__(self) -> None:
        check(self.weight >= 0 and math.isfinite(self.weight), f"weight: must be >= 0; got {self.weight}")


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


ADAPT: Registry[Adapter] = Registry("adapt")


def check_compatible(adapt: Any, data: Any, finetune: Any, monitor: str) -> None:
    """Cross-group checks before any compute: adaptation and the target scores need a target domain, and feature
    alignment needs backbone features that train."""
    from src.finetune import FINETUNE

    if monitor.startswith("val/target_") and not data.has_target:
        raise ValueError(
            f"objective.metric={monitor} is a target-domain score, but data '{data.name}' has no target domain"
        )
    if adapt.name == "none":
        return
    if not data.has_target:
        raise ValueError(
            f"adapt={adapt.name} needs a target domain, but data '{data.name}' has none; set data.target_shift "
            "(digits: invert | rotate | noise), data.target_path (text_table) or data.target_dir (image_folder)"
        )
    strategy = FINETUNE.entry(finetune.name).factory
    features_train = strategy.trains_backbone or not strategy.frozen_groups_fixed  # LoRA: adapters inside groups
    if ADAPT.entry(adapt.name).factory.aligns_features and not features_train:
        raise ValueError(
            f"adapt={adapt.name} aligns backbone features, but finetune={finetune.name} never trains the backbone "
            "(feature alignment cannot change frozen features); use finetune=full/partial/gradual_unfreeze/lp_ft/"
            "lora, or a method on the predictions: adapt=mcc or adapt=entropy"
        )
