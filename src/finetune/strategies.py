"""The basic strategies: linear probe, full fine-tuning, and the from-scratch baseline."""

from __future__ import annotations

from src.finetune.strategy import Strategy


class Full(Strategy):
    """Every layer group trains from the first step."""


class LinearProbe(Strategy):
    """Backbone frozen (no gradients computed through it); only the new head trains."""

    trains_backbone = False

    def trainable_groups(self, epoch: int, n_groups: int) -> set[int]:
        return set()


class Scratch(Strategy):
    """Same architecture, random init, everything trains: the baseline transfer is judged against."""

    pretrained = False
