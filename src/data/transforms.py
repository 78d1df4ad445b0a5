"""Image transforms as small composable callables on ``(C, H, W)`` float tensors (torch + Pillow only).

The base install has no torchvision, so the few pieces we need live here. Each piece is a plain callable,
so new augmentations (random-resized-crop, colour jitter, ...) slot into ``Compose`` without touching callers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

Transform = Callable[[torch.Tensor], torch.Tensor]


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """A decoded Pillow image as a ``(C, H, W)`` float tensor in [0, 1]."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for transform in self.transforms:
            x = transform(x)
        return x


class Resize:
    """Resize (bilinear, antialiased) so the SHORTER side equals ``size``, keeping the aspect ratio."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if min(h, w) == self.size:
            return x
        scale = self.size / min(h, w)
        out_hw = (max(self.size, round(h * scale)), max(self.size, round(w * scale)))
        return F.interpolate(x[None], size=out_hw, mode="bilinear", align_corners=False, antialias=True)[0]


class CenterCrop:
    """Crop the central ``size x size`` window (the input must be at least that large)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        top, left = (h - self.size) // 2, (w - self.size) // 2
        return x[..., top : top + self.size, left : left + self.size]


class RandomHorizontalFlip:
    """Mirror left-right with probability ``p`` (torch RNG, so DataLoader workers are seeded properly)."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(-1) if torch.rand(()) < self.p else x


class RepeatChannels:
    """Repeat a single-channel image to ``channels`` (grey digits into an RGB backbone)."""

    def __init__(self, channels: int) -> None:
        self.channels = channels

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == self.channels:
            return x
        if x.shape[0] != 1:
            raise ValueError(f"cannot repeat {x.shape[0]} channels to {self.channels}")
        return x.expand(self.channels, *x.shape[1:]).contiguous()


class Normalize:
    """``(x - mean) / std`` per channel, with the backbone's statistics."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"Normalize: {self.mean.shape[0]} mean/std values for a {x.shape[0]}-channel image")
        return (x - self.mean) / self.std
