"""Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) on image batches, with soft-label targets.

The mixed targets go to the batch as `soft_labels`; `TransferModule` then uses them as the task loss's targets,
where `label_smoothing` still applies (torch smooths probability targets too).
"""

from __future__ import annotations

import torch

from src.regularization.config import MixupConfig
from src.tasks.base import Task


def _beta(alpha: float) -> float:
    return float(torch.distributions.Beta(alpha, alpha).sample())


def _cutmix_box(height: int, width: int, lam: float) -> tuple[slice, slice]:
    """A box covering about `1 - lam` of the image, centred uniformly at random (clipped at the borders)."""
    cut = (1 - lam) ** 0.5
    h, w = int(height * cut), int(width * cut)
    cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
    return slice(max(cy - h // 2, 0), min(cy + h // 2, height)), slice(max(cx - w // 2, 0), min(cx + w // 2, width))


class Mixup:
    """Batch transform: mixes each sample with a random other one of the batch (a permutation), images and labels."""

    def __init__(self, cfg: MixupConfig, task: Task) -> None:
        self.cfg, self.task = cfg, task

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        if float(torch.rand(())) >= cfg.prob:
            return batch
        x = batch["pixel_values"]
        targets = batch.get("soft_labels")
        if targets is None:
            targets = self.task.soft_targets(batch["labels"]).to(x.dtype)
        perm = torch.randperm(len(x), device=x.device)
        use_cutmix = cfg.cutmix_alpha > 0 and (cfg.mixup_alpha == 0 or float(torch.rand(())) < cfg.switch_prob)
        if use_cutmix:
            rows, cols = _cutmix_box(x.shape[-2], x.shape[-1], _beta(cfg.cutmix_alpha))
            mixed = x.clone()
            mixed[..., rows, cols] = x[perm][..., rows, cols]
            lam = 1 - (rows.stop - rows.start) * (cols.stop - cols.start) / (x.shape[-2] * x.shape[-1])
        else:
            lam = _beta(cfg.mixup_alpha)
            mixed = lam * x + (1 - lam) * x[perm]
        return {**batch, "pixel_values": mixed, "soft_labels": lam * targets + (1 - lam) * targets[perm]}
