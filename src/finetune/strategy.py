"""The strategy contract and the callback that applies a strategy's freezing schedule.

A strategy answers one question — which backbone layer groups are trainable at epoch E — so the
freezing state is a pure function of the epoch. That makes resume trivial (the state is re-derived
from the restored epoch, cf. Lightning #21901) and lets every optimizer parameter group exist from
the start: unfreezing flips `requires_grad`, it never rebuilds the optimizer or scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning.pytorch as pl
from torch import nn

from src.backbones.base import Backbone, LayerGroup
from src.module import LossTerm
from src.registry import Registry


@dataclass
class FinetuneConfig:
    """Fields every strategy has. `init_from`: a checkpoint path or MLflow run id to start the backbone from."""

    name: str = "full"
    init_from: str | None = None


class Strategy:
    """Base strategy: everything trainable from epoch 0, pretrained weights."""

    pretrained: bool = True
    ce_weight: float = 1.0  # weight of the cross-entropy term (distillation gives the rest to its KL term)

    def __init__(self, cfg: FinetuneConfig) -> None:
        self.cfg = cfg

    def prepare(self, backbone: Backbone) -> Backbone:
        """Adapt the built backbone before training (LoRA injects adapters here); identity by default."""
        return backbone

    def loss_terms(self) -> list[LossTerm]:
        """Extra training-loss terms the strategy adds (distillation's KL to a teacher); none by default."""
        return []

    def trainable_groups(self, epoch: int, n_groups: int) -> set[int]:
        """Indices (input -> output) of the backbone layer groups that train during `epoch`."""
        return set(range(n_groups))

    def callbacks(self) -> list[pl.Callback]:
        return [FreezeSchedule(self)]


FINETUNE: Registry[Strategy] = Registry("finetune")


def set_trainable(groups: list[LayerGroup], trainable: set[int]) -> None:
    for i, group in enumerate(groups):
        for p in group.parameters():
            p.requires_grad_(i in trainable)


def count_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class FreezeSchedule(pl.Callback):
    """Applies `strategy.trainable_groups(epoch)` at setup (before any DDP wrapping) and every epoch start."""

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        groups = pl_module.backbone.layer_groups()
        set_trainable(groups, self.strategy.trainable_groups(trainer.current_epoch, len(groups)))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._apply(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(trainer, pl_module)
