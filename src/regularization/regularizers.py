"""`build`: what the regularization config (`src.regularization.config`) contributes to a run."""

from __future__ import annotations

from dataclasses import dataclass, field

import lightning.pytorch as pl

from src.backbones.base import Backbone
from src.module import BatchTransform, LossTerm
from src.regularization.augment import ImageAugment, TokenDropout
from src.regularization.config import RegularizationConfig
from src.regularization.ema import EMA
from src.regularization.l2sp import L2SP, NoBackboneWeightDecay
from src.regularization.mixup import Mixup
from src.regularization.reference import PretrainedReference
from src.regularization.wise_ft import WiseFT
from src.tasks.base import Task


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
        out.callbacks.append(WiseFT(reference, cfg.wise_ft_alphas, cfg.wise_ft_curve))
    return out
