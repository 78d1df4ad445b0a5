"""The fine-tuning strategies' config schemas (torch-free: a config is validated before any heavy import); each
implementation module imports its schema from here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from src.registry import Registry
from src.schema import check

FINETUNE: Registry[Any] = Registry("finetune")


@dataclass
class BatchNormPolicy:
    """Applied to BN layers of frozen layer groups only; the defaults freeze them completely (fastai's BnFreeze)."""

    train_affine: bool = False
    update_stats: bool = False
    eval_mode: bool = True

    def __post_init__(self) -> None:
        check(
            not (self.eval_mode and self.update_stats),
            "bn.update_stats: eval_mode never updates running statistics; set one of them to false",
        )


@FINETUNE.register("full", "src.finetune.strategies:Full")
@dataclass
class FinetuneConfig:
    """Fields every strategy has. `lr`: what `optim.lr` defaults to (a head on frozen features needs a far higher LR
    than fine-tuning a pretrained network); `init_from`: a checkpoint path or MLflow run id to start the backbone from;
    `bn`: what batch-norm layers inside frozen layer groups do (see `src.finetune.bn`)."""

    name: str = "full"
    lr: float | None = None  # optim.lr's default under this strategy (YAML: the backbone's, or the strategy's own)
    init_from: str | None = None
    bn: BatchNormPolicy = field(default_factory=BatchNormPolicy)


@dataclass
class ProbeFitConfig(FinetuneConfig):
    """Strategies whose head can be fitted instead of stepped: `probe_fit` fits it by the task's convex probe
    (L-BFGS on features extracted once, or read from the feature cache; src.finetune.probe_fit)."""

    probe_fit: bool = False
    probe_l2: float = 1.0e-3  # probe_fit: L2 penalty on the head weights (added to the task's mean loss)

    def __post_init__(self) -> None:
        check(self.probe_l2 >= 0, f"probe_l2: must be >= 0; got {self.probe_l2}")


@FINETUNE.register("linear_probe", "src.finetune.strategies:LinearProbe")
@dataclass
class LinearProbeConfig(ProbeFitConfig):
    """`probe_fit: true`: the head is fitted once, before the first step, and its LR is 0 (the fit is the
    optimum): one epoch then validates it; more epochs are refused, they would repeat the same scores."""

    name: str = "linear_probe"


@FINETUNE.register("scratch", "src.finetune.strategies:Scratch")
@dataclass
class ScratchConfig(FinetuneConfig):
    def __post_init__(self) -> None:
        check(self.init_from is None, f"init_from: scratch trains from random init; got {self.init_from!r}")


@FINETUNE.register("partial", "src.finetune.schedules:Partial")
@dataclass
class PartialConfig(FinetuneConfig):
    name: str = "partial"
    k: int = 1  # the first k groups (input side) stay frozen

    def __post_init__(self) -> None:
        check(self.k >= 0, f"k: must be >= 0; got {self.k}")


@FINETUNE.register("gradual_unfreeze", "src.finetune.schedules:GradualUnfreeze")
@dataclass
class GradualUnfreezeConfig(FinetuneConfig):
    name: str = "gradual_unfreeze"
    every_n_epochs: int = 1  # epochs between two unfreezing steps
    groups_per_step: int = 1  # layer groups unfrozen at each step

    def __post_init__(self) -> None:
        check(self.every_n_epochs >= 1, f"every_n_epochs: must be >= 1; got {self.every_n_epochs}")
        check(self.groups_per_step >= 1, f"groups_per_step: must be >= 1; got {self.groups_per_step}")


@dataclass
class Milestone:
    epoch: int = 0
    unfreeze: Any = "all"  # a count of groups from the top, a list of group names, or "all"

    def __post_init__(self) -> None:
        check(self.epoch >= 0, f"milestones.epoch: must be >= 0; got {self.epoch}")
        u = self.unfreeze
        valid = (
            u == "all"
            or (isinstance(u, int) and not isinstance(u, bool) and u >= 0)
            or (isinstance(u, list) and all(isinstance(name, str) for name in u))
        )
        check(valid, f"milestones.unfreeze: a count >= 0, a list of layer-group names or 'all'; got {u!r}")


@FINETUNE.register("milestones", "src.finetune.schedules:Milestones")
@dataclass
class MilestonesConfig(FinetuneConfig):
    name: str = "milestones"
    milestones: list[Milestone] = field(default_factory=lambda: [Milestone(0, 1), Milestone(2, "all")])


@FINETUNE.register("lp_ft", "src.finetune.schedules:LpFt")
@dataclass
class LpFtConfig(ProbeFitConfig):
    name: str = "lp_ft"
    probe_epochs: int = 1  # epochs of linear probing (backbone frozen) before fine-tuning everything
    probe_lr_scale: float = 10.0  # multiplies the head's LR while probing (a linear probe wants a larger LR)
    ft_lr_scale: float = 0.5  # multiplies the backbone groups' LRs from the first fine-tuning epoch on
    restart_schedule: bool = True  # fine-tuning gets its own warmup + decay (two runs, as in the paper)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.probe_epochs >= 0, f"probe_epochs: must be >= 0; got {self.probe_epochs}")
        check(self.probe_lr_scale > 0, f"probe_lr_scale: must be > 0; got {self.probe_lr_scale}")
        check(self.ft_lr_scale > 0, f"ft_lr_scale: must be > 0; got {self.ft_lr_scale}")


@FINETUNE.register("lora", "src.finetune.lora:Lora")
@dataclass
class LoraFinetuneConfig(FinetuneConfig):
    name: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    target_modules: list[str] | None = None  # None: attention query/value if any, else every Conv2d/Linear

    def __post_init__(self) -> None:
        check(self.r >= 1, f"r: must be >= 1; got {self.r}")
        check(self.alpha > 0, f"alpha: must be > 0; got {self.alpha}")
        check(0 <= self.dropout < 1, f"dropout: must be in [0, 1); got {self.dropout}")
        check(self.target_modules is None or len(self.target_modules) > 0, "target_modules: a non-empty list or null")


@FINETUNE.register("distill", "src.finetune.distill:Distill")
@dataclass
class DistillConfig(FinetuneConfig):
    name: str = "distill"
    teacher: str = MISSING  # MLflow run id or checkpoint file of a fine-tuned run (backbone + head weights)
    teacher_backbone: dict[str, Any] | None = None  # the teacher's backbone config; None: from the run's config.yaml
    temperature: float = 4.0
    alpha: float = 0.5  # weight of the distillation term; cross-entropy gets 1 - alpha

    def __post_init__(self) -> None:
        check(self.temperature > 0, f"temperature: must be > 0; got {self.temperature}")
        check(0 <= self.alpha <= 1, f"alpha: must be in [0, 1]; got {self.alpha}")
