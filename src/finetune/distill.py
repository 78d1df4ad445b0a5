"""Knowledge distillation (Hinton et al. 2015): the run's backbone + head (the student) learn from a fine-tuned
teacher's softened predictions.

The teacher is a fine-tuned *classifier*: an earlier run's checkpoint (MLflow run id, or a checkpoint file),
holding `backbone.*` and `head.*`. Its architecture comes from that run's logged `config.yaml` (or
`teacher_backbone`, required for a bare file). A backbone config alone is not accepted as a teacher: its head
would be untrained, so its "soft labels" would be noise — fine-tune it first (e.g. `finetune=full`) and pass
that run. The teacher must have been fine-tuned on the same data (classes in the same order). Loss =
`alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE`; `distill/size_ratio` = all parameters (backbone +
head) of the student / of the teacher.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from src.backbones import BACKBONES
from src.backbones.base import Backbone, Preprocessing
from src.finetune.config import DistillConfig
from src.finetune.init import resolve_checkpoint
from src.finetune.strategy import Strategy
from src.module import OMITTED_STATE, TEACHER_LOGITS, Head, load_part
from src.tasks.base import Task

log = logging.getLogger(__name__)


class Classifier(nn.Module):
    """A frozen fine-tuned model: backbone + head, in eval mode."""

    def __init__(self, backbone: Backbone, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head
        self.requires_grad_(False)
        self.eval()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if TEACHER_LOGITS in batch:  # precomputed by the feature cache (src.features)
            return batch[TEACHER_LOGITS]
        return self.head(self.backbone(batch))


def _teacher_backbone_config(cfg: DistillConfig, client: MlflowClient | None) -> DictConfig:
    if cfg.teacher_backbone is not None:
        return OmegaConf.create(cfg.teacher_backbone)
    if Path(cfg.teacher).expanduser().is_file():
        raise ValueError(f"finetune.teacher={cfg.teacher!r} is a checkpoint file: set finetune.teacher_backbone")
    return OmegaConf.load(client.download_artifacts(cfg.teacher, "config.yaml")).backbone


def load_teacher(cfg: DistillConfig, client: MlflowClient | None) -> Classifier:
    """Rebuild the teacher's backbone (random init, no pretraining) and load its fine-tuned backbone + head."""
    checkpoint = torch.load(resolve_checkpoint(cfg.teacher, client), map_location="cpu", weights_only=True)
    head_state = {k[len("head.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("head.")}
    if not head_state:
        raise ValueError(f"finetune.teacher={cfg.teacher!r}: the checkpoint holds no 'head.*' weights")
    # Random init unless the checkpoint left frozen groups out: those are the pretrained weights.
    pretrained = any(k.startswith("backbone.") for k in checkpoint.get(OMITTED_STATE, []))
    backbone = BACKBONES.build(_teacher_backbone_config(cfg, client), pretrained=pretrained)
    load_part(backbone, checkpoint, "backbone")
    num_classes, feature_dim = head_state["1.weight"].shape
    head = Head(feature_dim, num_classes)
    head.load_state_dict(head_state)
    return Classifier(backbone, head)


def _inputs(p: Preprocessing) -> tuple:
    """What decides how a batch looks: the vocabulary for text; size, channels and normalisation for images."""
    if p.modality == "text":
        return (p.modality, p.tokenizer.get_vocab())
    return (p.modality, p.image_size, p.channels, tuple(p.mean), tuple(p.std))


def check_same_inputs(teacher: Backbone, student: Backbone) -> None:
    """Teacher and student read the same batches, so they must preprocess alike."""
    if _inputs(teacher.preprocessing) != _inputs(student.preprocessing):
        raise ValueError(
            "finetune.teacher: the teacher and the student backbone must take the same inputs "
            "(tokenizer, or image size/channels/normalisation)"
        )


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class DistillationLoss:
    """`alpha * T^2 * KL(teacher || student)` at temperature T (the T^2 keeps gradient scale independent of T)."""

    name = "kd"

    def __init__(self, teacher: Classifier, temperature: float, alpha: float) -> None:
        self.teacher, self.temperature, self.alpha = teacher, temperature, alpha

    def __call__(
        self, module: pl.LightningModule, batch: dict[str, torch.Tensor], logits: torch.Tensor
    ) -> torch.Tensor:
        self.teacher.to(logits.device)
        with torch.no_grad():
            target = F.log_softmax(self.teacher(batch) / self.temperature, dim=-1)
        student = F.log_softmax(logits / self.temperature, dim=-1)
        kl = F.kl_div(student, target, log_target=True, reduction="batchmean")
        return self.alpha * self.temperature**2 * kl


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, task: Task, prefix: str, device: torch.device) -> dict[str, float]:
    """The teacher scored by the run's task, as the student is."""
    outputs, labels = [], []
    for batch in loader:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        outputs.append(model.to(device)(batch).float())
        labels.append(batch["labels"])
    metrics = task.evaluate(torch.cat(outputs), torch.cat(labels), prefix)
    return {k: float(v) for k, v in metrics.items()}


class TeacherReport(pl.Callback):
    """Logs the teacher's validation metrics and the size ratio once at fit start, its test metrics at test end."""

    def __init__(self, teacher: Classifier) -> None:
        self.teacher = teacher

    def _log(self, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=0)
        log.info("distill: %s", metrics)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        classes, expected = self.teacher.head[-1].out_features, pl_module.task.num_outputs
        if classes != expected:
            raise ValueError(
                f"finetune.teacher: the teacher predicts {classes} classes, the data has {expected}; "
                "distil on the data (and label order) the teacher was fine-tuned on"
            )
        datamodule = trainer.datamodule
        student, teacher = n_params(pl_module), n_params(self.teacher)
        sizes = {
            "distill/student_params": student,
            "distill/teacher_params": teacher,
            "distill/size_ratio": student / teacher,
        }
        val = evaluate(self.teacher, datamodule.val_dataloader(), pl_module.task, "teacher/val/", pl_module.device)
        self._log(trainer, {**sizes, **val})

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = trainer.datamodule.test_dataloader()
        self._log(trainer, evaluate(self.teacher, loader, pl_module.task, "teacher/test/", pl_module.device))


class Distill(Strategy):
    """The student (the run's pretrained backbone + a new head) trains fully, from the teacher's soft labels and
    the true labels (`ce_weight = 1 - alpha`)."""

    cfg: DistillConfig

    def __init__(self, cfg: DistillConfig, client: MlflowClient | None = None) -> None:
        super().__init__(cfg, client)
        self.ce_weight = 1 - cfg.alpha
        self.teacher: Classifier | None = None

    def prepare(self, backbone: Backbone) -> Backbone:
        self.teacher = load_teacher(self.cfg, self.client)
        check_same_inputs(self.teacher.backbone, backbone)
        return backbone

    def loss_terms(self) -> list[DistillationLoss]:
        return [DistillationLoss(self.teacher, self.cfg.temperature, self.cfg.alpha)]

    def callbacks(self) -> list[pl.Callback]:
        return [*super().callbacks(), TeacherReport(self.teacher)]

    def frozen_models(self) -> dict[str, nn.Module]:
        return {TEACHER_LOGITS: self.teacher}
