"""Fine-tuning regularizers (`conf/regularization`): weight decay, label smoothing, head dropout, early stopping."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from src.schema import check


@dataclass
class EarlyStoppingConfig:
    patience: int | None = None  # None: off
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        check(
            self.patience is None or self.patience >= 1,
            f"early_stopping.patience: >= 1 or null; got {self.patience}",
        )


@dataclass
class RegularizationConfig:
    weight_decay: float = 0.01
    label_smoothing: float = 0.0
    head_dropout: float = 0.1
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)

    def __post_init__(self) -> None:
        check(self.weight_decay >= 0, f"weight_decay: must be >= 0; got {self.weight_decay}")
        check(0 <= self.label_smoothing < 1, f"label_smoothing: must be in [0, 1); got {self.label_smoothing}")
        check(0 <= self.head_dropout < 1, f"head_dropout: must be in [0, 1); got {self.head_dropout}")


@dataclass
class Regularizers:
    """What the regularization config contributes to a run, in the three places regularizers can act."""

    batch_transforms: list = field(default_factory=list)  # training-batch transforms (augmentation, mixup)
    loss_terms: list = field(default_factory=list)  # extra loss terms (L2-SP)
    callbacks: list = field(default_factory=list)  # Lightning callbacks (EMA, WiSE-FT)


def build(cfg: RegularizationConfig, backbone: nn.Module) -> Regularizers:
    """Regularizers that act on weights see the backbone as built (pretrained weights = the reference)."""
    return Regularizers()
