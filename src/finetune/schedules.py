"""Freezing schedules: which backbone layer groups train at which epoch (`FreezeSchedule` applies them).

Groups are indexed input -> output; "from the top" means from the group next to the head downwards. The head
always trains. Each schedule is a pure function of the epoch, so resuming mid-schedule restores it exactly.
"""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from src.backbones.base import Backbone
from src.finetune.config import Milestone, MilestonesConfig
from src.finetune.probe_fit import ProbeFitStrategy
from src.finetune.strategy import Strategy


def top_groups(count: int, n_groups: int) -> set[int]:
    """The `count` groups nearest the head."""
    if count > n_groups:
        raise ValueError(f"asked for {count} layer groups from the top, but the backbone has {n_groups}")
    return set(range(n_groups - count, n_groups))


class Partial(Strategy):
    """Shallow, generic layers frozen for the whole run; the deeper groups and the head train."""

    def trainable_groups(self, epoch: int, n_groups: int) -> set[int]:
        if self.cfg.k > n_groups:
            raise ValueError(f"finetune.k={self.cfg.k}, but the backbone has only {n_groups} layer groups")
        return set(range(self.cfg.k, n_groups))


class GradualUnfreeze(Strategy):
    """ULMFiT (Howard & Ruder 2018): the head alone first, then `groups_per_step` more groups from the top every
    `every_n_epochs` epochs, until everything trains."""

    def trainable_groups(self, epoch: int, n_groups: int) -> set[int]:
        steps = epoch // self.cfg.every_n_epochs
        return top_groups(min(n_groups, steps * self.cfg.groups_per_step), n_groups)


class Milestones(Strategy):
    """Explicit schedule: from each milestone's epoch on, its groups train too (unfreezing is cumulative); before
    the first milestone only the head trains."""

    def __init__(self, cfg: MilestonesConfig, client: MlflowClient | None = None) -> None:
        super().__init__(cfg, client)
        self.group_names: list[str] | None = None

    def prepare(self, backbone: Backbone) -> Backbone:
        """Learn the group names now, so a misspelt one fails before any training."""
        self.group_names = [g.name for g in backbone.layer_groups()]
        for milestone in self.cfg.milestones:
            self._groups(milestone, len(self.group_names))
        return backbone

    def _groups(self, milestone: Milestone, n_groups: int) -> set[int]:
        u = milestone.unfreeze
        if u == "all":
            return set(range(n_groups))
        if isinstance(u, int):
            return top_groups(u, n_groups)
        if self.group_names is None:
            raise RuntimeError("milestones by group name need Milestones.prepare(backbone) first")
        unknown = [name for name in u if name not in self.group_names]
        if unknown:
            raise ValueError(f"milestones.unfreeze: unknown layer groups {unknown}; choose from {self.group_names}")
        return {self.group_names.index(name) for name in u}

    def trainable_groups(self, epoch: int, n_groups: int) -> set[int]:
        reached = [m for m in self.cfg.milestones if m.epoch <= epoch]
        return set().union(*(self._groups(m, n_groups) for m in reached))


class LpFt(ProbeFitStrategy):
    """LP-FT (Kumar et al. 2022): probe first, so fine-tuning starts from a fitted head and distorts the pretrained
    features less; then fine-tune the whole network with the backbone at a lower LR. The probe is `probe_epochs`
    of head-only training at a large LR, or (`probe_fit`) the paper's logistic regression on features extracted
    once, which costs one forward pass and lets every epoch fine-tune (`probe_epochs: 0`)."""

    def trainable_groups(self, epoch: int, n_groups: int) -> set[int]:
        return set() if epoch < self.cfg.probe_epochs else set(range(n_groups))

    def lr_scale(self, epoch: int, group: int, n_groups: int) -> float:
        probing = epoch < self.cfg.probe_epochs
        if group == n_groups:
            return self.cfg.probe_lr_scale if probing else 1.0
        return 1.0 if probing else self.cfg.ft_lr_scale

    def schedule_restarts(self) -> list[int]:
        """Without a restart, fine-tuning would run on the cooled-down tail of the probe's schedule."""
        return [self.cfg.probe_epochs] if self.cfg.restart_schedule else []
