"""Distillation on the digits task: a fine-tuned teacher run, a smaller student distilled from it."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from mlflow.tracking import MlflowClient

from src.backbones import BACKBONES
from src.data import DATA
from src.finetune import FINETUNE
from src.finetune.distill import Classifier, DistillationLoss
from src.module import Head, TransferModule
from src.optim import OptimConfig, configure_optimizers
from tests.conftest import classification, run_cli

STUDENT = ["backbone.channels=[8,16]"]


def test_kd_term_is_zero_when_the_student_matches_the_teacher() -> None:
    torch.manual_seed(0)
    backbone = BACKBONES.build({"name": "small_cnn", "pretrain": None})
    teacher = Classifier(backbone, Head(backbone.feature_dim, 5))
    batch = {"pixel_values": torch.randn(6, 1, 8, 8)}
    kd = DistillationLoss(teacher, temperature=2.0, alpha=0.7)
    assert kd(None, batch, teacher(batch)).item() == pytest.approx(0.0, abs=1e-6)
    assert kd(None, batch, torch.randn(6, 5)).item() > 0


def test_a_teacher_file_needs_its_backbone_config(tmp_path: Path) -> None:
    ckpt = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": {"head.1.weight": torch.zeros(5, 64)}}, ckpt)
    strategy = FINETUNE.build({"name": "distill", "teacher": str(ckpt)})
    with pytest.raises(ValueError, match="teacher_backbone"):
        strategy.prepare(BACKBONES.build({"name": "small_cnn", "pretrain": None}))


def test_student_kd_loss_decreases_in_training() -> None:
    pl.seed_everything(0)
    teacher_backbone = BACKBONES.build({"name": "small_cnn", "pretrain": None})  # any fixed teacher will do
    teacher = Classifier(teacher_backbone, Head(teacher_backbone.feature_dim, 5))
    student = BACKBONES.build({"name": "small_cnn", "channels": [8, 16], "pretrain": None})
    dm = DATA.build(
        {"name": "digits", "batch_size": 25}, preprocessing=student.preprocessing, seed=0, task=classification()
    )
    dm.setup("fit")
    kd = DistillationLoss(teacher, temperature=4.0, alpha=1.0)
    module = TransferModule(
        student,
        Head(student.feature_dim, dm.task.num_outputs),
        dm.task,
        configure_optim=partial(configure_optimizers, cfg=OptimConfig(lr=1e-2, warmup_ratio=0.0), weight_decay=0.0),
        loss_terms=[kd],
        ce_weight=0.0,
    )
    batch = next(iter(dm.val_dataloader()))

    def kd_loss() -> float:
        module.eval()
        with torch.no_grad():
            return kd(module, batch, module(batch)).item()

    start = kd_loss()
    module.train()
    trainer = pl.Trainer(
        max_steps=30, logger=False, enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0
    )
    trainer.fit(module, datamodule=dm)
    assert kd_loss() < 0.5 * start


@pytest.mark.slow
def test_student_learns_from_a_fine_tuned_teacher_run(tmp_path: Path) -> None:
    proc = run_cli(["trainer.max_epochs=5", "tracking.run_name=teacher"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("transfer-lab").experiment_id
    (teacher,) = client.search_runs([experiment])
    args = ["finetune=distill", f"finetune.teacher={teacher.info.run_id}", "trainer.max_epochs=5", *STUDENT]
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (student,) = client.search_runs([experiment], "attributes.run_name != 'teacher'")
    metrics, params = student.data.metrics, student.data.params
    assert params["finetune.teacher"] == teacher.info.run_id and params["finetune.temperature"] == "4.0"
    losses = [
        m.value for m in sorted(client.get_metric_history(student.info.run_id, "train/loss"), key=lambda m: m.step)
    ]
    assert len(losses) == 5 and losses[-1] < losses[0], losses
    assert metrics["train/kd"] > 0
    # The teacher is the teacher run's best checkpoint, evaluated on the same seeded validation split.
    best_val = max(m.value for m in client.get_metric_history(teacher.info.run_id, "val/acc"))
    assert metrics["teacher/val/acc"] == pytest.approx(best_val, abs=1e-6)
    assert 0 <= metrics["teacher/test/acc"] <= 1 and 0 <= metrics["test/acc"] <= 1
    assert metrics["distill/size_ratio"] == pytest.approx(
        metrics["distill/student_params"] / metrics["distill/teacher_params"]
    )
    assert metrics["distill/size_ratio"] < 0.5
