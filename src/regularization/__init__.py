"""Fine-tuning regularizers (`conf/regularization`): weight decay, label smoothing, head dropout, early stopping,
and the transfer-specific ones, each in its own module: L2-SP, EMA of the weights, mixup/cutmix, batch
augmentation (images, text) and WiSE-FT. `build` turns the config into what a run plugs in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import lightning.pytorch as pl

from src.backbones.base import Backbone
from src.module import BatchTransform, LossTerm
from src.regularization.augment import AugmentConfig, ImageAugment, TokenDropout
from src.regularization.ema import EMA, EMAConfig
from src.regularization.l2sp import L2SP, L2SPConfig, NoBackboneWeightDecay
from src.regularization.mixup import Mixup, MixupConfig
from src.regularization.reference import PretrainedReference
from src.regularization.wise_ft import WiseFT
from src.schema import check
from src.tasks.base import Task


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
    l2_sp: L2SPConfig = field(default_factory=L2SPConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    wise_ft_alpha: float | None = None  # test with (1 - a) * pretrained + a * fine-tuned backbone; null/1 = off

    def __post_init__(self) -> None:
        check(self.weight_decay >= 0, f"weight_decay: must be >= 0; got {self.weight_decay}")
        check(0 <= self.label_smoothing < 1, f"label_smoothing: must be in [0, 1); got {self.label_smoothing}")
        check(0 <= self.head_dropout < 1, f"head_dropout: must be in [0, 1); got {self.head_dropout}")
        alpha = self.wise_ft_alpha
        check(alpha is None or 0 <= alpha <= 1, f"wise_ft_alpha: must be in [0, 1] or null; got {alpha}")

    @property
    def wise_ft_enabled(self) -> bool:
        return self.wise_ft_alpha is not None and self.wise_ft_alpha != 1.0


@dataclass
class Regularizers:
    """What the regularization config contributes to a run, in the three places regularizers can act."""

    batch_transforms: list[BatchTransform] = field(default_factory=list)  # training-batch transforms
    loss_terms: list[LossTerm] = field(default_factory=list)  # extra loss terms (L2-SP)
    callbacks: list[pl.Callback] = field(default_factory=list)  # EMA, WiSE-FT, L2-SP's weight-decay switch


def _batch_transforms(cfg: RegularizationConfig, backbone: Backbone, task: Task) -> list[BatchTransform]:
    """Augmentation first, mixup last (it mixes augmented images). Knobs for the other modality are an error,
    so a config never records an augmentation that did not happen.
    """
    modality = backbone.preprocessing.modality
    image_only = {"augment.hflip/crop_scale/color_jitter": cfg.augment.image_enabled, "mixup": cfg.mixup.enabled}
    for knob, enabled in image_only.items():
        if enabled and modality != "image":
            raise ValueError(f"regularization.{knob}: image-only, but the backbone takes {modality} inputs")
    if cfg.augment.token_dropout > 0 and modality != "text":
        raise ValueError(f"regularization.augment.token_dropout: text-only, but the backbone takes {modality} inputs")
    out: list[BatchTransform] = []
    if cfg.augment.image_enabled:
        out.append(ImageAugment(cfg.augment, backbone.preprocessing))
    if cfg.augment.token_dropout > 0:
        out.append(TokenDropout(cfg.augment.token_dropout, backbone.preprocessing.tokenizer))
    if cfg.mixup.enabled:
        out.append(Mixup(cfg.mixup, task))
    return out


def build(cfg: RegularizationConfig, backbone: Backbone, task: Task) -> Regularizers:
    """Regularizers that act on weights see the backbone as built (pretrained weights = the reference), so call
    this after any `init_from`/strategy `prepare` and before training.
    """
    out = Regularizers(batch_transforms=_batch_transforms(cfg, backbone, task))
    l2_sp = cfg.l2_sp
    reference = PretrainedReference(backbone) if l2_sp.alpha > 0 or cfg.wise_ft_enabled else None
    if l2_sp.alpha > 0 or l2_sp.beta > 0:
        out.loss_terms.append(L2SP(reference, l2_sp.alpha, l2_sp.beta))
        if l2_sp.alpha > 0 and not l2_sp.keep_weight_decay:
            out.callbacks.append(NoBackboneWeightDecay())
    if cfg.ema.decay is not None:
        out.callbacks.append(EMA(cfg.ema))
    if cfg.wise_ft_enabled:
        out.callbacks.append(WiseFT(reference, cfg.wise_ft_alpha))
    return out
