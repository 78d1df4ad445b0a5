"""Structured-config schema and validation: every composed config is checked before any compute.

Groups with several options (data, backbone, finetune) are validated against the schema their
registry entry declares; the fixed groups (optim, regularization, tracking, objective) against the
dataclasses below; `trainer` against Lightning's own `Trainer` signature.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from src.cache import CacheConfig
from src.optim import OptimConfig
from src.regularization import RegularizationConfig
from src.schema import ConfigError, check, check_choice
from src.tasks.config import refusals


@dataclass
class SecondaryObjective:
    """A further objective of multi-objective sweeps: the last logged value of any metric (e.g. trainable_params)."""

    metric: str
    direction: str = "minimize"

    def __post_init__(self) -> None:
        check_choice(self.direction, "direction", ("maximize", "minimize"))


@dataclass
class Objective:
    """The number a run reports to sweepers; `metric` is any logged `val/*` metric.

    With `secondary` objectives the run returns a list, `metric` first (the one checkpoints monitor).
    """

    metric: str = "val/acc"
    direction: str = "maximize"
    secondary: list[SecondaryObjective] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_choice(self.direction, "direction", ("maximize", "minimize"))
        check(
            self.metric.startswith("val/"),
            f"metric: must be a validation metric 'val/...'; got {self.metric!r}",
        )

    @property
    def metrics(self) -> list[str]:
        return [self.metric, *(s.metric for s in self.secondary)]

    @property
    def directions(self) -> list[str]:
        return [self.direction, *(s.direction for s in self.secondary)]


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
    log_model: bool = True  # log the tested weights as an MLflow pyfunc model `model` (src.serving)
    register_model: str | None = None  # also register that model in the Model Registry under this name

    def __post_init__(self) -> None:
        check(
            self.register_model is None or self.log_model,
            "register_model: needs log_model=true (only a logged model can be registered)",
        )


FIXED_GROUPS: dict[str, type] = {
    "objective": Objective,
    "optim": OptimConfig,
    "regularization": RegularizationConfig,
    "tracking": TrackingConfig,
    "cache": CacheConfig,
}


@dataclass
class RunConfig:
    """The validated, typed view of a composed config that `src.run` builds from."""

    seed: int
    objective: Objective
    task: Any
    data: Any
    backbone: Any
    finetune: Any
    adapt: Any
    optim: OptimConfig
    regularization: RegularizationConfig
    trainer: dict[str, Any]
    tracking: TrackingConfig
    cache: CacheConfig
    ckpt_path: str | None
    resume: str | None  # a run id or "last": continue that stopped run (src.tracking.resume)
    extra: dict[str, Any]  # other top-level keys, e.g. a sweep's settings, passed through untouched


def _parse(key: str, parse: Callable[[], Any]) -> Any:
    try:
        return parse()
    except OmegaConfBaseException as e:
        sub = getattr(e, "full_key", None) or getattr(e, "key", None)
        where = f"{key}.{sub}" if sub and not str(sub).startswith(key) else (sub or key)
        msg = str(getattr(e, "msg", e)).splitlines()[0]
        raise ConfigError(f"{where}: {msg}") from None
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
        msg = e.args[0] if e.args else str(e)
        raise ConfigError(f"{key}.{msg}" if ":" in str(msg).split()[0] else f"{key}: {msg}") from None


def _trainer_kwargs(node: DictConfig) -> dict[str, Any]:
    allowed = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self", "callbacks", "logger"}
    kwargs = OmegaConf.to_container(node, resolve=True)
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ConfigError(f"trainer.{unknown[0]}: not an argument of lightning.pytorch.Trainer")
    return kwargs


def check_pretraining_is_not_on_targets(backbone: Any, data: Any) -> None:
    """A backbone pretrained here (small_cnn) must never see the classes the run is measured on: an overlap would
    pretrain on the target's test images and report transfer that is not there."""
    pretrain = getattr(backbone, "pretrain_classes", None)
    targets = getattr(data, "target_classes", None)
    if getattr(backbone, "pretrain", None) is None or not pretrain or not targets:
        return
    if overlap := sorted(set(pretrain) & set(targets)):
        raise ConfigError(
            f"backbone.pretrain_classes: {list(pretrain)} overlaps data.target_classes {list(targets)} in {overlap}: "
            "pretraining would see the target test images; keep them disjoint (data.source_classes feeds "
            "pretrain_classes by default)"
        )


def validate(cfg: DictConfig) -> RunConfig:
    """Parse every group into its schema; raise `ConfigError` naming the first bad key."""
    from src.adapt import ADAPT, check_compatible
    from src.backbones import BACKBONES
    from src.data import DATA
    from src.finetune import FINETUNE
    from src.tasks import TASKS

    registries = {"task": TASKS, "data": DATA, "backbone": BACKBONES, "finetune": FINETUNE, "adapt": ADAPT}
    # Defaults that refer to other keys (optim.lr: ${finetune.lr}) are checked as the values they resolve to.
    # Without the `hydra` node a sweeper's config carries: its job-time values (hydra.job.num) are not set yet.
    run_keys = [k for k in cfg if k != "hydra"]
    cfg = _parse(
        "config",
        lambda c=cfg: OmegaConf.create(OmegaConf.to_container(OmegaConf.masked_copy(c, run_keys), resolve=True)),
    )
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
    monitor = parsed["objective"].metric
    _parse("adapt", lambda: check_compatible(parsed["adapt"], parsed["data"], parsed["finetune"], monitor))
    check_pretraining_is_not_on_targets(parsed["backbone"], parsed["data"])
    keys = ("task", "data", "finetune", "adapt", "regularization")
    for key, why in refusals(*(parsed[k] for k in keys)):
        raise ConfigError(f"{key}: {why}")
    seed = cfg.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed: must be a non-negative integer; got {seed!r}")
    known = {*registries, *FIXED_GROUPS, "trainer", "seed", "ckpt_path", "resume"}
    extra = {k: cfg[k] for k in cfg if k not in known}
    return RunConfig(
        seed=seed,
        trainer=_trainer_kwargs(cfg.trainer),
        ckpt_path=cfg.get("ckpt_path"),
        resume=None if cfg.get("resume") is None else str(cfg.get("resume")),
        extra=extra,
        **parsed,
    )
