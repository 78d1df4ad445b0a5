"""Freezing on real modules: frozen weights stay bit-identical and get no gradients; trainable ones move; the
batch-norm policy of frozen groups does exactly what its three knobs say."""

from __future__ import annotations

from functools import partial
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from src.backbones import BACKBONES
from src.data import DATA
from src.finetune import FINETUNE
from src.finetune.strategy import Strategy
from src.module import Head, TransferModule
from src.optim import OptimConfig, configure_optimizers
from tests.conftest import classification


def build(
    finetune: dict[str, Any], optim: OptimConfig | None = None, batch_size: int = 16
) -> tuple[Strategy, TransferModule, pl.LightningDataModule]:
    """The pieces `src.run` assembles, on the digits task with a randomly initialised small CNN (fast)."""
    pl.seed_everything(0)
    strategy = FINETUNE.build(finetune)
    backbone = strategy.prepare(BACKBONES.build({"name": "small_cnn", "pretrain": None}, pretrained=False))
    dm = DATA.build(
        {"name": "digits", "batch_size": batch_size},
        preprocessing=backbone.preprocessing,
        seed=0,
        task=classification(),
    )
    dm.setup("fit")
    optim = optim or OptimConfig(lr=1e-2, warmup_ratio=0.0)
    module = TransferModule(
        backbone,
        Head(backbone.feature_dim, dm.task.num_outputs),
        dm.task,
        configure_optim=partial(
            configure_optimizers, cfg=optim, weight_decay=0.01, restarts=strategy.schedule_restarts()
        ),
    )
    return strategy, module, dm


def trainer(callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    defaults = dict(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
    )
    return pl.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


def fit_steps(strategy_name: str, steps: int = 6) -> tuple[TransferModule, dict[str, torch.Tensor]]:
    strategy, module, dm = build({"name": strategy_name})
    before = {k: v.detach().clone() for k, v in module.named_parameters()}
    trainer(strategy.callbacks(), max_steps=steps).fit(module, datamodule=dm)
    return module, before


def test_linear_probe_freezes_backbone() -> None:
    module, before = fit_steps("linear_probe")
    for name, p in module.named_parameters():
        if name.startswith("backbone."):
            assert torch.equal(p, before[name]), f"{name} moved under linear_probe"
            assert not p.requires_grad and p.grad is None, f"{name} got a gradient"
        else:
            assert not torch.equal(p, before[name]), f"head parameter {name} did not train"


@pytest.mark.parametrize("strategy", ["full", "scratch"])
def test_full_and_scratch_train_everything(strategy: str) -> None:
    module, before = fit_steps(strategy)
    moved = [n for n, p in module.named_parameters() if not torch.equal(p, before[n])]
    assert set(moved) == set(before), f"unchanged: {set(before) - set(moved)}"


class BnModes(pl.Callback):
    """Records `training` of every backbone BN layer at each training batch (after the strategy's callbacks)."""

    def __init__(self) -> None:
        self.modes: list[set[bool]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.modes.append({m.training for m in pl_module.backbone.modules() if isinstance(m, _BatchNorm)})


def bn_state(module: TransferModule, kind: str) -> dict[str, torch.Tensor]:
    """BN running statistics ("stats") or affine parameters ("affine") of the backbone, copied."""
    keys = ("running_mean", "running_var") if kind == "stats" else ("weight", "bias")
    out = {}
    for name, m in module.backbone.named_modules():
        if isinstance(m, _BatchNorm):
            out |= {f"{name}.{k}": getattr(m, k).detach().clone() for k in keys}
    return out


@pytest.mark.parametrize(
    ("policy", "stats_move", "affine_moves", "bn_training"),
    [
        ({"train_affine": False, "update_stats": False, "eval_mode": True}, False, False, False),
        ({"train_affine": False, "update_stats": True, "eval_mode": False}, True, False, True),
        ({"train_affine": False, "update_stats": False, "eval_mode": False}, False, False, True),
        ({"train_affine": True, "update_stats": False, "eval_mode": True}, False, True, False),
    ],
)
def test_bn_policy_of_frozen_groups(policy: dict, stats_move: bool, affine_moves: bool, bn_training: bool) -> None:
    """linear_probe freezes every group; 2 epochs with validation in between, which Lightning follows by restoring
    the module modes it captured — eval mode must still hold in the second epoch."""
    strategy, module, dm = build({"name": "linear_probe", "bn": policy})
    stats, affine = bn_state(module, "stats"), bn_state(module, "affine")
    convs = {n: p.detach().clone() for n, p in module.backbone.named_parameters() if p.ndim > 1}
    modes = BnModes()
    trainer([*strategy.callbacks(), modes], max_epochs=2, limit_val_batches=1).fit(module, datamodule=dm)
    assert all(m == {bn_training} for m in modes.modes), modes.modes
    after_stats, after_affine = bn_state(module, "stats"), bn_state(module, "affine")
    assert all(torch.equal(stats[k], after_stats[k]) != stats_move for k in stats)
    assert all(torch.equal(affine[k], after_affine[k]) != affine_moves for k in affine)
    assert all(torch.equal(p, convs[n]) for n, p in module.backbone.named_parameters() if p.ndim > 1)


def test_bn_eval_mode_and_update_stats_conflict() -> None:
    with pytest.raises(ValueError, match="update_stats"):
        FINETUNE.config({"name": "partial", "bn": {"eval_mode": True, "update_stats": True}})


class StatsAtEpochStart(pl.Callback):
    def __init__(self) -> None:
        self.stats: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stats.append(bn_state(pl_module, "stats"))


def test_unfrozen_group_bn_returns_to_defaults() -> None:
    """LP-FT's switch: statistics stay put while probing (update_stats=false), move once the groups train."""
    strategy, module, dm = build({"name": "lp_ft", "probe_epochs": 1, "bn": {"eval_mode": False}})
    snapshots = StatsAtEpochStart()
    trainer([*strategy.callbacks(), snapshots], max_epochs=2).fit(module, datamodule=dm)
    probe_start, ft_start = snapshots.stats
    final = bn_state(module, "stats")
    assert all(torch.equal(probe_start[k], ft_start[k]) for k in final)
    assert not any(torch.equal(ft_start[k], final[k]) for k in final)
    assert all(m.track_running_stats for m in module.backbone.modules() if isinstance(m, _BatchNorm))
