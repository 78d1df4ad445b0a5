"""Freezing on real modules: frozen weights stay bit-identical and get no gradients; trainable ones move."""

from __future__ import annotations

from functools import partial

import lightning.pytorch as pl
import pytest
import torch

from src.backbones import BACKBONES
from src.data import DATA
from src.finetune import FINETUNE
from src.module import ClassifierHead, TransferModule
from src.optim import OptimConfig, configure_optimizers


def fit_steps(strategy_name: str, steps: int = 6) -> tuple[TransferModule, dict[str, torch.Tensor]]:
    pl.seed_everything(0)
    strategy = FINETUNE.build({"name": strategy_name})
    backbone = BACKBONES.build({"name": "small_cnn", "pretrain": None}, pretrained=strategy.pretrained)
    dm = DATA.build({"name": "digits", "batch_size": 16}, preprocessing=backbone.preprocessing, seed=0)
    dm.setup("fit")
    module = TransferModule(
        backbone,
        ClassifierHead(backbone.feature_dim, dm.num_classes),
        dm.num_classes,
        configure_optim=partial(configure_optimizers, cfg=OptimConfig(lr=1e-2, warmup_ratio=0.0), weight_decay=0.0),
    )
    before = {k: v.detach().clone() for k, v in module.named_parameters()}
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=strategy.callbacks(),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        accelerator="cpu",
    )
    trainer.fit(module, datamodule=dm)
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
