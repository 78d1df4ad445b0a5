"""Few-shot digits: scikit-learn's real 8x8 handwritten digits (offline), split by class.

A backbone pretrains on ``source_classes`` (see ``digits_arrays``); the data module serves only the
``target_classes`` with ``labels_per_class`` labelled training images each, so transfer is measurable in
seconds on a CPU.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch.nn import functional as F
from torch.utils.data import Dataset

from src.data.common import DataModule, PixelShift, stratified_split
from src.data.config import TARGET_SHIFTS, DigitsConfig, EvalSetConfig
from src.data.transforms import Compose, Normalize, RepeatChannels, Resize, Transform
from src.schema import ConfigError

if TYPE_CHECKING:  # no runtime import: src.backbones imports this module (small_cnn pretraining)
    from src.backbones.base import Preprocessing

DIGITS_SIZE = 8
ROTATION_DEGREES = 30.0
NOISE_STD = 0.35


def digits_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as ``(N, 1, 8, 8)`` float images in [0, 1] (pixel counts / 16) and long labels."""
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.as_tensor(digits.target, dtype=torch.long)


def shift_images(images: torch.Tensor, shift: str, seed: int) -> torch.Tensor:
    """The target domain: ``(N, 1, H, W)`` images in [0, 1] with inverted intensities, rotated by
    ``ROTATION_DEGREES`` (bilinear), or with seeded Gaussian noise of std ``NOISE_STD`` (clipped to [0, 1])."""
    if shift == "invert":
        return 1.0 - images
    if shift == "rotate":
        angle = math.radians(ROTATION_DEGREES)
        rotation = torch.tensor([[math.cos(angle), -math.sin(angle), 0.0], [math.sin(angle), math.cos(angle), 0.0]])
        grid = F.affine_grid(rotation.expand(len(images), 2, 3), list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if shift == "noise":
        noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)) * NOISE_STD
        return (images + noise).clamp(0.0, 1.0)
    raise ValueError(f"unknown target shift {shift!r}; choose one of {', '.join(TARGET_SHIFTS)}")


class TransformedImages(Dataset):
    """In-memory images + labels, transformed per sample into the batch-dict contract."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def pixels(self, index: int) -> torch.Tensor:
        """One image before its transform, in [0, 1] (what an evaluation set's shift changes)."""
        return self.images[index]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.transform(self.images[index]), "labels": self.labels[index]}


def digits_transform(preprocessing: Preprocessing) -> Transform:
    """Normalise with the backbone's statistics; upsample and repeat channels if it wants bigger RGB input."""
    steps: list[Transform] = []
    if preprocessing.image_size is not None and preprocessing.image_size != DIGITS_SIZE:
        steps.append(Resize(preprocessing.image_size))
    if preprocessing.channels != 1:
        steps.append(RepeatChannels(preprocessing.channels))
    steps.append(Normalize(preprocessing.mean, preprocessing.std))
    return Compose(steps)


class DigitsDataModule(DataModule):
    """Target digits, per class and seeded: ``labels_per_class`` train, ``val_per_class`` val, rest test.

    With a ``target_shift`` (domain adaptation) the rest is the shifted target domain instead: half of it per class
    is ``target_train`` (its labels reach training only in an oracle run), half ``target_test``; test = val then.
    """

    modality = "image"
    cfg: DigitsConfig

    def _build(self) -> tuple[dict[str, Dataset], list[str]]:
        images, labels = digits_arrays()
        index_of = {digit: i for i, digit in enumerate(self.cfg.target_classes)}
        keep = torch.isin(labels, torch.tensor(self.cfg.target_classes)).nonzero().squeeze(1)
        images = images[keep]
        labels = torch.tensor([index_of[int(digit)] for digit in labels[keep]], dtype=torch.long)
        fewest = int(torch.bincount(labels).min())
        if self.cfg.labels_per_class + self.cfg.val_per_class >= fewest:  # the rest is the test split
            raise ConfigError(
                f"data.labels_per_class + data.val_per_class = {self.cfg.labels_per_class} + {self.cfg.val_per_class}"
                f", but the rarest target class has only {fewest} images (some must stay for test); lower them"
            )
        train, val, test = stratified_split(
            labels.tolist(), lambda n: [self.cfg.labels_per_class, self.cfg.val_per_class], self.seed
        )
        train = train[self.train_indices(labels[train].tolist())]
        transform = digits_transform(self.preprocessing)
        parts = {"train": (images, train), "val": (images, val)}
        if self.cfg.target_shift is None:
            parts["test"] = (images, test)
        else:
            shifted = shift_images(images, self.cfg.target_shift, self.seed)
            halves = stratified_split(labels[test].tolist(), lambda n: [n // 2], self.seed)
            parts |= {"target_train": (shifted, test[halves[0]]), "target_test": (shifted, test[halves[1]])}
        splits: dict[str, Dataset] = {
            split: TransformedImages(x[idx], labels[idx], transform) for split, (x, idx) in parts.items()
        }
        return {**splits, **self.eval_splits(splits)}, [str(digit) for digit in self.cfg.target_classes]

    def pixel_shift(self, spec: EvalSetConfig) -> PixelShift:
        """Digits' domain-adaptation shifts (`target_shift`) are evaluation sets too, without adaptation."""
        if spec.shift is None:
            return super().pixel_shift(spec)
        shift = spec.shift

        def shifted(pixels: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
            return shift_images(pixels[None], shift, int(rng.integers(2**31)))[0]

        return shifted
