"""The `regularization` group's config schema (torch-free: a config is validated before any heavy import); each
regularizer's module imports its part from here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from src.schema import check

# The metric prefix of a WiSE-FT curve: test/wise_ft/<alpha>/[<set>/]<metric> (also a reserved eval-set name).
WISE_FT = "wise_ft"


@dataclass
class L2SPConfig:
    alpha: float = 0.0  # weight of ||w - w0||^2 on the backbone; 0 = off
    beta: float = 0.0  # weight of ||w||^2 on the new head; 0 = off
    keep_weight_decay: bool = False  # with alpha > 0: also keep weight_decay (towards 0) on the backbone groups

    def __post_init__(self) -> None:
        check(self.alpha >= 0, f"l2_sp.alpha: must be >= 0; got {self.alpha}")
        check(self.beta >= 0, f"l2_sp.beta: must be >= 0; got {self.beta}")


@dataclass
class EMAConfig:
    decay: float | None = None  # EMA decay per optimizer step, e.g. 0.99; null = off
    start_step: int = 0  # first optimizer step averaged (validation before it sees the initial weights)
    every_n_steps: int = 1  # update the average every n optimizer steps

    def __post_init__(self) -> None:
        check(self.decay is None or 0 < self.decay < 1, f"ema.decay: must be in (0, 1) or null; got {self.decay}")
        check(self.start_step >= 0, f"ema.start_step: must be >= 0; got {self.start_step}")
        check(self.every_n_steps >= 1, f"ema.every_n_steps: must be >= 1; got {self.every_n_steps}")


@dataclass
class MixupConfig:
    prob: float = 0.0  # probability that a training batch is mixed; 0 = off
    mixup_alpha: float = 0.2  # Beta(a, a) of the mixup coefficient; 0 = no mixup (cutmix only)
    cutmix_alpha: float = 0.0  # Beta(a, a) of the cutmix area; 0 = no cutmix
    switch_prob: float = 0.5  # with both on: probability of cutmix instead of mixup for a batch

    def __post_init__(self) -> None:
        check(0 <= self.prob <= 1, f"mixup.prob: must be in [0, 1]; got {self.prob}")
        check(self.mixup_alpha >= 0, f"mixup.mixup_alpha: must be >= 0; got {self.mixup_alpha}")
        check(self.cutmix_alpha >= 0, f"mixup.cutmix_alpha: must be >= 0; got {self.cutmix_alpha}")
        check(0 <= self.switch_prob <= 1, f"mixup.switch_prob: must be in [0, 1]; got {self.switch_prob}")
        check(
            self.prob == 0 or self.mixup_alpha > 0 or self.cutmix_alpha > 0,
            "mixup.prob > 0 needs mixup_alpha > 0 or cutmix_alpha > 0",
        )

    @property
    def enabled(self) -> bool:
        return self.prob > 0


@dataclass
class AugmentConfig:
    hflip: float = 0.0  # image: probability of a horizontal flip per sample
    crop_scale: list[float] | None = None  # image: random-resized-crop area range [min, max] of the image; null = off
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333])  # image: crop aspect-ratio range
    color_jitter: float = 0.0  # image: brightness/contrast/saturation factors drawn from [1 - s, 1 + s]; 0 = off
    token_dropout: float = 0.0  # text: probability of replacing each non-special token by [MASK] (else pad); 0 = off

    def __post_init__(self) -> None:
        check(0 <= self.hflip <= 1, f"augment.hflip: must be in [0, 1]; got {self.hflip}")
        scale = self.crop_scale
        check(
            scale is None or (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1),
            f"augment.crop_scale: [min, max] with 0 < min <= max <= 1, or null; got {scale}",
        )
        ratio = self.crop_ratio
        check(len(ratio) == 2 and 0 < ratio[0] <= ratio[1], f"augment.crop_ratio: [min, max] > 0; got {ratio}")
        check(0 <= self.color_jitter < 1, f"augment.color_jitter: must be in [0, 1); got {self.color_jitter}")
        check(0 <= self.token_dropout < 1, f"augment.token_dropout: must be in [0, 1); got {self.token_dropout}")

    @property
    def image_enabled(self) -> bool:
        return self.hflip > 0 or self.crop_scale is not None or self.color_jitter > 0


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
    # test with (1 - a) * pretrained + a * fine-tuned backbone; null/1 = off. A list: score every alpha (the
    # WiSE-FT curve, src/regularization/wise_ft.py), then test with the last one listed.
    wise_ft_alpha: Any = None

    def __post_init__(self) -> None:
        check(self.weight_decay >= 0, f"weight_decay: must be >= 0; got {self.weight_decay}")
        check(0 <= self.label_smoothing < 1, f"label_smoothing: must be in [0, 1); got {self.label_smoothing}")
        check(0 <= self.head_dropout < 1, f"head_dropout: must be in [0, 1); got {self.head_dropout}")
        alphas = self.wise_ft_alpha if isinstance(self.wise_ft_alpha, list) else [self.wise_ft_alpha]
        valid = [a for a in alphas if isinstance(a, int | float) and not isinstance(a, bool) and 0 <= a <= 1]
        check(
            self.wise_ft_alpha is None or (len(valid) == len(alphas) > 0 and len(set(alphas)) == len(alphas)),
            f"wise_ft_alpha: must be in [0, 1], a list of distinct such values, or null; got {self.wise_ft_alpha}",
        )

    @property
    def wise_ft_alphas(self) -> list[float]:
        """The alphas to score, the one kept (tested, logged as the model) last; empty when WiSE-FT is off."""
        if self.wise_ft_alpha is None:
            return []
        return [float(a) for a in (self.wise_ft_alpha if self.wise_ft_curve else [self.wise_ft_alpha])]

    @property
    def wise_ft_curve(self) -> bool:
        """Whether every alpha of a list is scored (`test/wise_ft/<alpha>/...`), not just one used."""
        return isinstance(self.wise_ft_alpha, list)

    @property
    def wise_ft_enabled(self) -> bool:
        return self.wise_ft_curve or self.wise_ft_alphas not in ([], [1.0])
