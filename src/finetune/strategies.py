"""The basic strategies: linear probe, full fine-tuning, and the from-scratch baseline."""

from __future__ import annotations

from src.finetune.probe_fit import ProbeFitStrategy
from src.finetune.strategy import Strategy
from src.schema import ConfigError


class Full(Strategy):
    """Every layer group trains from the first step."""


class LinearProbe(ProbeFitStrategy):
    """Backbone frozen (no gradients computed through it); only the new head trains -- by gradient steps, or
    (`probe_fit`) fitted once by the task's convex probe, after which its LR is 0."""

    trains_backbone = False

    def trainable_groups(self, epoch: int, n_groups: int) -> set[int]:
        return set()

    def lr_scale(self, epoch: int, group: int, n_groups: int) -> float:
        return 0.0 if self.cfg.probe_fit else 1.0

    def check(self, n_groups: int, epochs: int | None) -> None:
        if self.cfg.probe_fit and epochs != 1:
            raise ConfigError(
                "finetune.probe_fit: the fitted head is final, so every epoch after the first repeats its scores; "
                f"set trainer.max_epochs=1 (got {epochs if epochs is not None else 'unbounded'})"
            )


class Scratch(Strategy):
    """Same architecture, random init, everything trains: the baseline transfer is judged against."""

    pretrained = False
