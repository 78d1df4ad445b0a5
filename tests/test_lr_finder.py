"""The ratio-keeping LR finder on real modules: every group's LR moves by one factor, weights come back untouched,
the suggestion lies on the swept curve; through the CLI the plot lands in MLflow and `lr_find_apply` takes effect."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from src.lr_finder import apply_lr, find_lr, suggest
from src.optim import OptimConfig
from tests.conftest import run_cli
from tests.test_freeze import build


def test_sweep_keeps_group_ratios_and_restores_weights() -> None:
    cfg = OptimConfig(lr=1e-2, layer_decay=0.5, head_lr_mult=3.0, lr_find_steps=30, lr_find_max_lr=10.0)
    strategy, module, dm = build({"name": "partial", "k": 1}, cfg)
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    result = find_lr(module, dm, cfg, strategy.callbacks(), {"accelerator": "cpu"})
    n = len(result.losses)
    assert 5 < n <= 30 and len(result.lrs) == len(result.group_lrs) == n
    expected = np.geomspace(1e-6, 10.0, 30)[:n]
    assert result.lrs == pytest.approx(list(expected), rel=1e-9)
    # Param groups: (decay, no-decay) per layer group: stem, block.0, block.1, head.
    want = [1e-2 * 0.5**3, 1e-2 * 0.5**2, 1e-2 * 0.5, 3e-2]
    for base, lrs in zip(result.lrs, result.group_lrs, strict=True):
        per_layer_group = lrs[::2]
        assert per_layer_group == pytest.approx([w * base / 1e-2 for w in want], rel=1e-9)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items()), "weights/buffers not restored"
    assert result.lrs[0] <= result.suggestion <= result.lrs[-1]


class SeenSettings(pl.Callback):
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seen = (trainer.gradient_clip_val, trainer.gradient_clip_algorithm, trainer.accumulate_grad_batches)


def test_the_finder_trains_under_the_runs_clipping_and_accumulation() -> None:
    cfg = OptimConfig(lr=1e-2, lr_find_steps=8)
    strategy, module, dm = build({"name": "full"}, cfg)
    seen = SeenSettings()
    run_trainer = {
        "accelerator": "cpu",
        "gradient_clip_val": 0.5,
        "gradient_clip_algorithm": "value",
        "accumulate_grad_batches": 2,
        "max_epochs": 30,
        "log_every_n_steps": 1,
    }
    find_lr(module, dm, cfg, [*strategy.callbacks(), seen], run_trainer)
    assert seen.seen == (0.5, "value", 2)


def test_suggestions() -> None:
    lrs = list(np.geomspace(1e-4, 1, 9))
    losses = [2.0, 2.0, 1.9, 1.0, 0.5, 0.4, 0.45, 1.0, 3.0]
    assert suggest(lrs, losses, "steepest") == lrs[3]
    assert suggest(lrs, losses, "min_div_10") == pytest.approx(lrs[5] / 10)


def test_apply_scales_explicit_group_lrs_too() -> None:
    cfg = OptimConfig(lr=1e-3, group_lrs=[1e-4, 5e-4, 1e-3])
    apply_lr(cfg, 1e-2)
    assert cfg.lr == 1e-2 and cfg.group_lrs == pytest.approx([1e-3, 5e-3, 1e-2])


def test_cli_logs_plot_and_applies_suggestion(tmp_path: Path) -> None:
    proc = run_cli(
        [
            "trainer.max_epochs=1",
            "optim.lr_find=true",
            "optim.lr_find_steps=20",
            "optim.lr_find_apply=true",
            "optim.layer_decay=0.5",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("transfer-lab").experiment_id])
    assert {"lr_finder.png", "lr_finder.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    suggested = run.data.metrics["lr_find/suggested_lr"]
    assert float(run.data.params["lr_find.applied_lr"]) == pytest.approx(suggested)
    # Trained with the suggestion (constant ratios kept): epoch 0's head LR is the suggestion times the schedule.
    head = client.get_metric_history(run.info.run_id, "lr-group-3")[0].value
    block1 = client.get_metric_history(run.info.run_id, "lr-group-2")[0].value
    assert block1 / head == pytest.approx(0.5)
    assert 0 < head <= suggested and head != pytest.approx(3e-3)
