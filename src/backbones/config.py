"""The backbone options' config schemas (torch-free: a config is validated before any heavy import); each
implementation module imports its schema from here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from src.registry import Registry
from src.schema import check

BACKBONES: Registry[Any] = Registry("backbone")

VARIANTS = (0, 1, 2)


def check_depth(depth: int | None) -> None:
    """`depth` keeps the first `depth` layer groups (a truncated backbone is a candidate of its own: its features
    are the pooled output of the last group kept); null keeps them all. The upper bound is checked when built."""
    check(depth is None or depth >= 1, f"depth: must be >= 1 or null (every layer group); got {depth}")


@BACKBONES.register("efficientnet_lite", "src.backbones.efficientnet_lite:build_efficientnet_lite")
@dataclass
class EfficientNetLiteConfig:
    name: str = "efficientnet_lite"
    lr: float | None = None  # the base LR optim.lr defaults to when this backbone trains (declared in its YAML)
    variant: int = 0  # 0 | 1 | 2 (input 224 / 240 / 260 px)
    drop_connect_rate: float = 0.2  # stochastic depth of the trainable blocks (the pretraining recipe's 0.2)
    bn_momentum: float = 0.1  # BN running-statistics momentum (torch convention; the TF pretraining used 0.01)
    depth: int | None = None  # layer groups kept (stem, stages.0-6, head: 9); null = all

    @property
    def has_source_head(self) -> bool:
        """The ImageNet classifier ships with the weights; it reads the head's 1,280-d features only."""
        return self.depth is None

    def __post_init__(self) -> None:
        check_depth(self.depth)
        check(self.variant in VARIANTS, f"variant: must be one of {', '.join(map(str, VARIANTS))}; got {self.variant}")
        check(0 <= self.drop_connect_rate < 1, f"drop_connect_rate: must be in [0, 1); got {self.drop_connect_rate}")
        check(0 < self.bn_momentum <= 1, f"bn_momentum: must be in (0, 1]; got {self.bn_momentum}")


POOLINGS = ("cls", "mean")


def check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling: must be one of {', '.join(POOLINGS)}, got {pooling!r}")


@BACKBONES.register("hf", "src.backbones.hf:build_hf")
@dataclass
class HFConfig:
    name: str = "hf"
    lr: float | None = None  # the base LR optim.lr defaults to when this backbone trains (declared in its YAML)
    model: str = MISSING  # hub id (e.g. microsoft/resnet-50) or a local save_pretrained() folder
    revision: str | None = None  # hub branch / tag / commit
    trust_remote_code: bool = False  # allow model code shipped with the checkpoint
    pooling: str = "cls"  # cls | mean (see HFBackbone.forward)
    image_size: int | None = None  # vision: override the input side length of the image processor config
    depth: int | None = None  # BERT-likes: layer groups kept (embeddings, encoder.layer.i, pooler); null = all

    def __post_init__(self) -> None:
        check_pooling(self.pooling)
        check_depth(self.depth)
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"image_size: must be a positive integer or null, got {self.image_size}")


@BACKBONES.register("minilm", "src.backbones.minilm:build_minilm")
@dataclass
class MiniLMConfig:
    name: str = "minilm"
    lr: float | None = None  # the base LR optim.lr defaults to when this backbone trains (declared in its YAML)
    pooling: str = "mean"  # cls | mean; mean is what the sentence-transformers model was trained with
    depth: int | None = None  # layer groups kept (embeddings, encoder.layer.0-5, pooler: 8); null = all

    def __post_init__(self) -> None:
        check_pooling(self.pooling)
        check_depth(self.depth)


PRETRAINS = ("digits",)


@BACKBONES.register("small_cnn", "src.backbones.small_cnn:build_small_cnn")
@dataclass
class SmallCNNConfig:
    name: str = "small_cnn"
    lr: float | None = None  # the base LR optim.lr defaults to when this backbone trains (declared in its YAML)
    in_channels: int = 1
    channels: list[int] = field(default_factory=lambda: [16, 32, 64])  # stem width, then one block per entry
    image_size: int = 8  # what the data is resized to; digits are 8x8
    pretrain: str | None = "digits"  # digits | None (random init even when pretrained=True)
    pretrain_classes: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    pretrain_epochs: int = 10
    pretrain_seed: int = 0
    cache_dir: str | None = None  # None: $TRANSFER_LAB_CACHE or ~/.cache/transfer-lab
    depth: int | None = None  # layer groups kept (stem, block.0, ...); null = all

    @property
    def has_source_head(self) -> bool:
        """Pretraining's classifier over `pretrain_classes`, kept with the weights; it reads the full features."""
        return self.pretrain is not None and self.depth is None

    def __post_init__(self) -> None:
        check_depth(self.depth)
        if self.in_channels < 1:
            raise ValueError(f"in_channels: must be >= 1, got {self.in_channels}")
        if not self.channels or any(c < 1 for c in self.channels):
            raise ValueError(f"channels: must be a non-empty list of positive widths, got {self.channels}")
        if self.image_size < 1:
            raise ValueError(f"image_size: must be >= 1, got {self.image_size}")
        if self.pretrain is not None and self.pretrain not in PRETRAINS:
            raise ValueError(f"pretrain: must be one of {', '.join(PRETRAINS)} or null, got {self.pretrain!r}")
        classes = self.pretrain_classes
        if len(set(classes)) != len(classes) or len(classes) < 2 or any(not 0 <= c <= 9 for c in classes):
            raise ValueError(f"pretrain_classes: must be at least 2 distinct digits 0..9, got {classes}")
        if self.pretrain_epochs < 1:
            raise ValueError(f"pretrain_epochs: must be >= 1, got {self.pretrain_epochs}")


@BACKBONES.register("timm", "src.backbones.timm:build_timm")
@dataclass
class TimmConfig:
    name: str = "timm"
    lr: float | None = None  # the base LR optim.lr defaults to when this backbone trains (declared in its YAML)
    model: str = MISSING  # timm model name, e.g. resnet18 or vit_small_patch16_224.augreg_in21k
