"""Training-batch augmentation in plain torch (no torchvision): images (flip, random-resized crop, colour
jitter) and text (token dropout). Applied by `TransferModule` to training batches only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from src.backbones.base import Preprocessing
from src.regularization.config import AugmentConfig


def _uniform(n: int, low: float, high: float, device: torch.device) -> torch.Tensor:
    return torch.empty(n, device=device).uniform_(low, high)


class ImageAugment:
    """Flip + random-resized crop as one affine resampling per sample (`grid_sample`), then colour jitter in
    [0, 1] pixel space (the batch arrives normalised with the backbone's mean/std and leaves normalised).
    """

    def __init__(self, cfg: AugmentConfig, preprocessing: Preprocessing) -> None:
        self.cfg = cfg
        self.mean = torch.tensor(preprocessing.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(preprocessing.std).view(1, -1, 1, 1)

    def _crop_and_flip(self, x: torch.Tensor) -> torch.Tensor:
        n, device = len(x), x.device
        width = height = torch.ones(n, device=device)
        if self.cfg.crop_scale is not None:
            area = _uniform(n, *self.cfg.crop_scale, device)
            log_ratio = _uniform(n, *(math.log(r) for r in self.cfg.crop_ratio), device)
            width = (area * log_ratio.exp()).sqrt().clamp(max=1)  # fractions of the side
            height = (area / log_ratio.exp()).sqrt().clamp(max=1)
        flip = torch.where(torch.rand(n, device=device) < self.cfg.hflip, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3, device=device)
        theta[:, 0, 0], theta[:, 1, 1] = width * flip, height
        theta[:, 0, 2] = (torch.rand(n, device=device) * 2 - 1) * (1 - width)  # crop centre inside the image
        theta[:, 1, 2] = (torch.rand(n, device=device) * 2 - 1) * (1 - height)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def _jitter(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        pixels = x * std + mean
        s, n = self.cfg.color_jitter, len(x)

        def factor() -> torch.Tensor:
            return _uniform(n, 1 - s, 1 + s, x.device).view(n, 1, 1, 1)

        pixels = pixels * factor()  # brightness
        level = pixels.mean(dim=(1, 2, 3), keepdim=True)
        pixels = (pixels - level) * factor() + level  # contrast
        if pixels.shape[1] > 1:  # saturation needs colour
            gray = pixels.mean(dim=1, keepdim=True)
            pixels = (pixels - gray) * factor() + gray
        return (pixels.clamp(0, 1) - mean) / std

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = batch["pixel_values"]
        if self.cfg.hflip > 0 or self.cfg.crop_scale is not None:
            x = self._crop_and_flip(x)
        if self.cfg.color_jitter > 0:
            x = self._jitter(x)
        return {**batch, "pixel_values": x}


class TokenDropout:
    """Replaces a random `token_dropout` fraction of the real, non-special tokens with the tokenizer's mask token
    (or its pad token when it has none), a cheap text augmentation in the spirit of word dropout.
    """

    def __init__(self, p: float, tokenizer: object) -> None:
        replacement = tokenizer.mask_token_id if tokenizer.mask_token_id is not None else tokenizer.pad_token_id
        if replacement is None:
            raise ValueError("augment.token_dropout: the tokenizer has neither a mask nor a pad token")
        self.p, self.replacement = p, replacement
        self.special = torch.tensor(sorted(tokenizer.all_special_ids))

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids = batch["input_ids"]
        droppable = ~torch.isin(ids, self.special.to(ids.device))
        if "attention_mask" in batch:
            droppable &= batch["attention_mask"].bool()
        drop = droppable & (torch.rand(ids.shape, device=ids.device) < self.p)
        return {**batch, "input_ids": ids.masked_fill(drop, self.replacement)}
