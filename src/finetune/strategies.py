"""The basic strategies: linear probe, full fine-tuning, and the from-scratch baseline."""

from __future__ import annotations

from dataclasses import dataclass

from src.finetune.strategy import FINETUNE, FinetuneConfig, Strategy
from src.schema import check


@FINETUNE.register("full", FinetuneConfig)
class Full(Strategy):
    """Every layer group trains from the first step."""


@FINETUNE.register("linear_probe", FinetuneConfig)
class LinearProbe(Strategy):
    """Backbone frozen (no gradients computed through it); only the new head trains."""

    trains_backbone = False

    def trainable_groups(self, epoch: int, n_groups: int) -> set[int]:
        return set()


@dataclass
class ScratchConfig(FinetuneConfig):
    def __post_init__(self) -> None:
        check(self.init_from is None, f"init_from: scratch trains from random init; got {self.init_from!r}")


@FINETUNE.register("scratch", ScratchConfig)
class Scratch(Strategy):
    """Same architecture, random init, everything trains: the baseline transfer is judged against."""

    pretrained = False
