"""Optimizer and LR schedule from `conf/optim`: discriminative per-layer-group LRs, one shared schedule.

The schedule is a single multiplicative factor (LambdaLR) applied to every group's base LR, so the
ratios between layer groups hold at every step, through warmup and annealing alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from src.backbones.base import LayerGroup
from src.config import OptimConfig
from src.finetune.param_groups import layer_lrs, param_groups


def lr_factor(step: int, total: int, scheduler: str, warmup_ratio: float, min_lr_ratio: float) -> float:
    """Multiplier of the base LR at `step` of `total` optimizer steps."""
    if scheduler == "constant":
        return 1.0
    warmup = int(total * warmup_ratio)
    if scheduler == "onecycle":
        warmup = max(warmup, int(0.3 * total))
    if step < warmup:
        if scheduler == "onecycle":  # cosine ramp from lr/25, as torch's OneCycleLR
            start = 1 / 25
            return start + (1 - start) * (1 - math.cos(math.pi * step / warmup)) / 2
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 1 - progress if scheduler == "linear" else (1 + math.cos(math.pi * progress)) / 2
    return min_lr_ratio + (1 - min_lr_ratio) * shape


def build_optimizer(
    cfg: OptimConfig, groups: list[LayerGroup], head: nn.Module, weight_decay: float
) -> torch.optim.Optimizer:
    lrs = cfg.group_lrs or layer_lrs(cfg.lr, len(groups), cfg.layer_decay, cfg.head_lr_mult)
    pgroups = param_groups(groups, head, list(lrs), weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(pgroups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(pgroups, lr=cfg.lr, betas=tuple(cfg.betas))


def configure_optimizers(
    module: nn.Module, cfg: OptimConfig, weight_decay: float, total_steps: Callable[[], int]
) -> dict:
    """What `LightningModule.configure_optimizers` returns: optimizer + per-step LambdaLR."""
    optimizer = build_optimizer(cfg, module.backbone.layer_groups(), module.head, weight_decay)
    factor = partial(
        lr_factor,
        total=max(1, total_steps()),
        scheduler=cfg.scheduler,
        warmup_ratio=cfg.warmup_ratio,
        min_lr_ratio=cfg.min_lr_ratio,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
