"""The strategy contract and the callback that applies a strategy's freezing schedule.

A strategy answers two questions — which backbone layer groups are trainable during epoch E, and by how much
each group's LR is scaled then — so the freezing state is a pure function of the epoch. That makes
resume trivial (the state is re-derived from the restored epoch at every epoch start, so a resumed run cannot
come back re-frozen as in Lightning #21901) and lets every optimizer parameter group exist from the start:
unfreezing flips `requires_grad`, it never rebuilds the optimizer or scheduler.

DDP (Lightning #20340): `DistributedDataParallel` registers for gradient all-reduce only the parameters that
require grad when it wraps the model, so a group unfrozen later would train on each rank's local gradients and
the replicas silently diverge. When the trainable set changes during a DDP run, `FreezeSchedule` therefore keeps
every parameter trainable until the model is wrapped, freezes after wrapping, and requires
`find_unused_parameters=True` (frozen parameters produce no gradient, and DDP must not wait for them) and no
`static_graph` (the set of parameters used changes). A schedule that never changes (linear_probe, partial) is
frozen before wrapping and needs neither.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy
from mlflow.tracking import MlflowClient
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR

from src.backbones.base import Backbone, LayerGroup
from src.finetune.bn import BatchNormPolicy, apply_bn_policy, hold_eval
from src.finetune.config import FinetuneConfig
from src.module import LossTerm
from src.schema import ConfigError, blame


class Strategy:
    """Base strategy: everything trainable from epoch 0, pretrained weights."""

    pretrained: bool = True
    ce_weight: float = 1.0  # weight of the cross-entropy term (distillation gives the rest to its KL term)
    # Whether a layer group outside `trainable_groups` computes exactly its pretrained function, so the feature
    # cache may store its output (False for LoRA: adapters train inside "frozen" groups).
    frozen_groups_fixed: bool = True
    # Whether the strategy reads the frozen backbone's features of the training set (a fitted probe: LP-FT's, or
    # linear_probe's with probe_fit).
    extracts_features: bool = False

    trains_backbone: bool = True  # False where the backbone is frozen by design (linear_probe; lora's adapters)

    def __init__(self, cfg: FinetuneConfig, client: MlflowClient | None = None) -> None:
        self.cfg = cfg
        self.client = client  # the run's MLflow client, for strategies that read other runs (distillation's teacher)

    def prepare(self, backbone: Backbone) -> Backbone:
        """Adapt the built backbone before training (LoRA injects adapters here); identity by default."""
        return backbone

    def loss_terms(self) -> list[LossTerm]:
        """Extra training-loss terms the strategy adds (distillation's KL to a teacher); none by default."""
        return []

    def trainable_groups(self, epoch: int, n_groups: int) -> set[int]:
        """Indices (input -> output) of the backbone layer groups that train during `epoch`."""
        return set(range(n_groups))

    def lr_scale(self, epoch: int, group: int, n_groups: int) -> float:
        """Factor on layer group `group`'s scheduled LR during `epoch` (`group == n_groups`: the head); 1 by default."""
        return 1.0

    def schedule_restarts(self) -> list[int]:
        """Epochs at which the LR schedule starts over (warmup, then decay over the phase); none by default."""
        return []

    def callbacks(self) -> list[pl.Callback]:
        return [FreezeSchedule(self)]

    def frozen_models(self) -> dict[str, nn.Module]:
        """Frozen models whose per-sample outputs the feature cache may precompute, by the batch key they fill
        (distillation's teacher); none by default."""
        return {}

    def check(self, n_groups: int, epochs: int | None) -> None:
        """Before compute: a schedule under which no layer group trains within the run would be a linear probe
        recorded as another strategy; `epochs` None means unbounded."""
        if not self.trains_backbone or epochs is None:
            return
        with blame("finetune"):
            trained = set().union(*(self.trainable_groups(e, n_groups) for e in range(epochs)))
        if not trained:
            raise ConfigError(
                f"finetune={self.cfg.name}: no layer group trains within trainer.max_epochs={epochs}, so the run "
                "would be a linear probe; unfreeze earlier, raise trainer.max_epochs, or use finetune=linear_probe"
            )


def set_trainable(groups: list[LayerGroup], trainable: set[int]) -> None:
    for i, group in enumerate(groups):
        for p in group.parameters():
            p.requires_grad_(i in trainable)


def count_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def schedule_changes(strategy: Strategy, n_groups: int, epochs: int | None) -> bool:
    """Whether the trainable set differs between any two of the first `epochs` epochs (None: unbounded, assume so)."""
    if epochs is None:
        return True
    return len({frozenset(strategy.trainable_groups(e, n_groups)) for e in range(epochs)}) > 1


def scale_lrs(trainer: pl.Trainer, strategy: Strategy, n_groups: int) -> None:
    """Each group's LR becomes `initial_lr * strategy.lr_scale(epoch, group) * schedule factor`.

    Rewriting the LambdaLR's `base_lrs` (not the current LR) composes with the shared schedule, and deriving
    them from the untouched `initial_lr` makes it idempotent, so re-applying it after a resume is exact.
    """
    epoch = trainer.current_epoch
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        scales = [strategy.lr_scale(epoch, g["layer_group"], n_groups) for g in scheduler.optimizer.param_groups]
        if not isinstance(scheduler, LambdaLR):
            if any(scale != 1.0 for scale in scales):
                raise TypeError(f"LR scaling needs the LambdaLR of src.optim; got {type(scheduler).__name__}")
            continue
        for j, (group, scale) in enumerate(zip(scheduler.optimizer.param_groups, scales, strict=True)):
            scheduler.base_lrs[j] = group["initial_lr"] * scale
            group["lr"] = scheduler.base_lrs[j] * scheduler.lr_lambdas[j](scheduler.last_epoch)


def _epoch_horizon(trainer: pl.Trainer) -> int | None:
    """An upper bound on the epochs this fit can run (max_steps bounds it too), None when unbounded."""
    bounds = [b for b in (trainer.max_epochs, trainer.max_steps) if b is not None and b > 0]
    return min(bounds) if bounds else None


class FreezeSchedule(pl.Callback):
    """Applies the strategy's epoch state: `requires_grad` per layer group, the BN policy of frozen groups and
    the LR scales — at setup (before DDP wrapping, see the module docstring), at fit start and at every
    training-epoch start; BN eval mode again at every batch start, since Lightning restores the module modes it
    captured before validation.
    """

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy
        self.groups: list[LayerGroup] = []
        self.trainable: set[int] = set()
        self.eval_bns: list[nn.Module] = []  # batch norms the policy holds in eval mode
        self.ddp_dynamic = False  # set in setup: a DDP fit whose trainable set changes (see the module docstring)

    @property
    def bn(self) -> BatchNormPolicy:
        return self.strategy.cfg.bn

    def _freeze(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.trainable = self.strategy.trainable_groups(trainer.current_epoch, len(self.groups))
        set_trainable(self.groups, self.trainable)
        self.eval_bns = apply_bn_policy(self.groups, self.trainable, self.bn, pl_module.training)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.groups = pl_module.backbone.layer_groups()
        n = len(self.groups)
        self.ddp_dynamic = (
            stage == "fit"
            and isinstance(trainer.strategy, DDPStrategy)
            and schedule_changes(self.strategy, n, _epoch_horizon(trainer))
        )
        if self.ddp_dynamic:
            set_trainable(self.groups, set(range(n)))  # so DDP registers every parameter; frozen in on_fit_start
            return
        self._freeze(trainer, pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ddp = trainer.strategy.model
        wrapped = isinstance(ddp, DistributedDataParallel)
        if self.ddp_dynamic and wrapped and (not ddp.find_unused_parameters or ddp.static_graph):
            raise ValueError(
                f"finetune={self.strategy.cfg.name} changes the trainable layer groups during training; under "
                "DDP that needs find_unused_parameters=True and static_graph=False, e.g. "
                "trainer.strategy=ddp_find_unused_parameters_true (Lightning #20340)"
            )
        self._freeze(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._freeze(trainer, pl_module)
        scale_lrs(trainer, self.strategy, len(self.groups))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: object, idx: int) -> None:
        hold_eval(self.eval_bns)
