"""`EpochCheckpoint`: `last.ckpt` is always the latest epoch's state (the resume point), linked to `best.ckpt`
only when that epoch also wrote it."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from mlflow.tracking import MlflowClient
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from src.build import EpochCheckpoint
from tests.test_failures import QUICK, only_run, run_in_process

SCORES = [0.5, 0.7, 0.6, 0.8, 0.4]  # val/acc per epoch: improves at epochs 0, 1, 3


class Scripted(pl.LightningModule):
    """A real training loop whose validation score follows SCORES, so which epoch improves is known."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 2)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self.layer(batch[0]), batch[1])

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("val/acc", SCORES[self.current_epoch])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Watch(pl.Callback):
    """After each epoch's checkpointing (at the next epoch's start, and at the end): is last.ckpt a link, and which
    epoch do last.ckpt and best.ckpt hold?"""

    def __init__(self, folder: Path) -> None:
        self.folder, self.seen = folder, []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch:
            self.on_fit_end(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        last = self.folder / "last.ckpt"
        state = torch.load(last, weights_only=False)
        best = torch.load(self.folder / "best.ckpt", weights_only=False)
        self.seen.append((last.is_symlink(), state["epoch"], best["epoch"]))


def test_last_links_to_best_only_in_improving_epochs(tmp_path: Path) -> None:
    data = TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    checkpoint = EpochCheckpoint(dirpath=tmp_path, filename="best", monitor="val/acc", mode="max", save_last=True)
    watch = Watch(tmp_path)
    trainer = pl.Trainer(
        max_epochs=len(SCORES),
        callbacks=[checkpoint, watch],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Scripted(), DataLoader(data, batch_size=4), DataLoader(data, batch_size=8))
    # (last is a link, epoch in last.ckpt, epoch in best.ckpt) after each epoch
    assert watch.seen == [(True, 0, 0), (True, 1, 1), (False, 2, 1), (True, 3, 3), (False, 4, 3)]
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == trainer.global_step
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "last.ckpt"]


def test_a_run_without_checkpoints_reports_its_best_logged_score(tmp_path: Path) -> None:
    """`trainer.enable_checkpointing=false` (a regime map's runs validate once and are never tested): nothing is
    written under checkpoints/, and the objective is still the best validation value, from the logged history."""
    overrides = ["trainer.max_epochs=3", "trainer.enable_checkpointing=false", "tracking.log_model=false"]
    assert run_in_process(tmp_path, *overrides, *QUICK[1:]) == 0
    run = only_run(tmp_path)
    history = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(run.info.run_id, "val/acc")
    assert run.info.status == "FINISHED" and len(history) == 3
    assert run.data.metrics["best/val/acc"] == max(m.value for m in history)
    assert not list(tmp_path.rglob("*.ckpt"))
