"""Structured-config schema and validation: every composed config is checked before any compute.

Groups with several options (data, backbone, finetune) are validated against the schema their
registry entry declares; the fixed groups (optim, regularization, tracking, objective) against the
dataclasses below; `trainer` against Lightning's own `Trainer` signature.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A composed config that must not run; the message names the offending key."""


def check(condition: bool, message: str) -> None:
    """Range/choice check used in ``__post_init__`` of the schemas; the group prefix is added later."""
    if not condition:
        raise ValueError(message)


def check_choice(value: Any, key: str, choices: tuple[str, ...]) -> None:
    check(value in choices, f"{key}: must be one of {', '.join(choices)}; got {value!r}")


@dataclass
class Objective:
    """The number a run reports to sweepers; `metric` is any logged `val/*` metric."""

    metric: str = "val/acc"
    direction: str = "maximize"

    def __post_init__(self) -> None:
        check_choice(self.direction, "direction", ("maximize", "minimize"))
        check(
            self.metric.startswith("val/"),
            f"metric: must be a validation metric 'val/...'; got {self.metric!r}",
        )


@dataclass
class OptimConfig:
    """Optimizer + LR schedule. One optimizer parameter group per layer group, created up front."""

    name: str = "adamw"
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9
    head_lr_mult: float = 1.0
    layer_decay: float = 1.0  # group i (from the head) gets lr * layer_decay**i
    group_lrs: list[float] | None = None  # explicit LRs, backbone groups input->output then head
    scheduler: str = "warmup_cosine"
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        check_choice(self.name, "name", ("adamw", "sgd"))
        check(self.lr > 0 and math.isfinite(self.lr), f"lr: must be > 0; got {self.lr}")
        check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"betas: two values in [0, 1); got {self.betas}",
        )
        check(self.head_lr_mult > 0, f"head_lr_mult: must be > 0; got {self.head_lr_mult}")
        check(0 < self.layer_decay <= 1, f"layer_decay: must be in (0, 1]; got {self.layer_decay}")
        check(not self.group_lrs or min(self.group_lrs) >= 0, f"group_lrs: must be >= 0; got {self.group_lrs}")
        check_choice(self.scheduler, "scheduler", ("warmup_cosine", "linear", "onecycle", "constant"))
        check(0 <= self.warmup_ratio < 1, f"warmup_ratio: must be in [0, 1); got {self.warmup_ratio}")
        check(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio: must be in [0, 1]; got {self.min_lr_ratio}")


@dataclass
class EarlyStoppingConfig:
    patience: int | None = None  # None: off
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        check(
            self.patience is None or self.patience >= 1,
            f"early_stopping.patience: >= 1 or null; got {self.patience}",
        )


@dataclass
class RegularizationConfig:
    weight_decay: float = 0.01
    label_smoothing: float = 0.0
    head_dropout: float = 0.1
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)

    def __post_init__(self) -> None:
        check(self.weight_decay >= 0, f"weight_decay: must be >= 0; got {self.weight_decay}")
        check(0 <= self.label_smoothing < 1, f"label_smoothing: must be in [0, 1); got {self.label_smoothing}")
        check(0 <= self.head_dropout < 1, f"head_dropout: must be in [0, 1); got {self.head_dropout}")


@dataclass
class TrackingConfig:
    """MLflow. Relative paths/URIs are resolved against the directory the user launched from."""

    uri: str = "sqlite:///mlflow.db"
    experiment: str = "transfer-lab"
    artifact_location: str | None = "mlruns"
    run_name: str | None = None
    parent_run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    log_checkpoint: bool = True


FIXED_GROUPS: dict[str, type] = {
    "objective": Objective,
    "optim": OptimConfig,
    "regularization": RegularizationConfig,
    "tracking": TrackingConfig,
}


@dataclass
class RunConfig:
    """The validated, typed view of a composed config that `src.run` builds from."""

    seed: int
    objective: Objective
    data: Any
    backbone: Any
    finetune: Any
    optim: OptimConfig
    regularization: RegularizationConfig
    trainer: dict[str, Any]
    tracking: TrackingConfig
    ckpt_path: str | None
    extra: dict[str, Any]  # other top-level keys, e.g. a sweep's settings, passed through untouched


def _parse(key: str, parse: Callable[[], Any]) -> Any:
    try:
        return parse()
    except OmegaConfBaseException as e:
        sub = getattr(e, "full_key", None) or getattr(e, "key", None)
        where = f"{key}.{sub}" if sub and not str(sub).startswith(key) else (sub or key)
        msg = str(getattr(e, "msg", e)).splitlines()[0]
        raise ConfigError(f"{where}: {msg}") from None
    except (ValueError, KeyError, TypeError) as e:
        msg = e.args[0] if e.args else str(e)
        raise ConfigError(f"{key}.{msg}" if ":" in str(msg).split()[0] else f"{key}: {msg}") from None


def _trainer_kwargs(node: DictConfig) -> dict[str, Any]:
    allowed = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self", "callbacks", "logger"}
    kwargs = OmegaConf.to_container(node, resolve=True)
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ConfigError(f"trainer.{unknown[0]}: not an argument of lightning.pytorch.Trainer")
    return kwargs


def validate(cfg: DictConfig) -> RunConfig:
    """Parse every group into its schema; raise `ConfigError` naming the first bad key."""
    from src.backbones import BACKBONES
    from src.data import DATA
    from src.finetune import FINETUNE

    registries = {"data": DATA, "backbone": BACKBONES, "finetune": FINETUNE}
    for key in [*registries, *FIXED_GROUPS, "trainer"]:
        if key not in cfg:
            raise ConfigError(f"{key}: missing config group")
    for key, reg in registries.items():
        name = cfg[key].get("name")
        if name not in reg.names():
            raise ConfigError(f"{key}.name: unknown {key} {name!r}; choose one of {', '.join(reg.names())}")
    parsed = {key: _parse(key, lambda r=reg, k=key: r.config(cfg[k])) for key, reg in registries.items()}
    for key, schema in FIXED_GROUPS.items():
        parsed[key] = _parse(
            key, lambda s=schema, k=key: OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(s), cfg[k]))
        )
    seed = cfg.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed: must be a non-negative integer; got {seed!r}")
    known = {*registries, *FIXED_GROUPS, "trainer", "seed", "ckpt_path"}
    extra = {k: cfg[k] for k in cfg if k not in known}
    return RunConfig(
        seed=seed,
        trainer=_trainer_kwargs(cfg.trainer),
        ckpt_path=cfg.get("ckpt_path"),
        extra=extra,
        **parsed,
    )
