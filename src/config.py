"""Structured-config schema and validation: every composed config is checked before any compute.

Groups with several options (data, backbone, finetune) are validated against the schema their
registry entry declares; the fixed groups (optim, regularization, tracking, objective, cache) against the
dataclasses below (the regularization one in `src.regularization.config`). Nothing here imports torch or Lightning,
so a config mistake is reported in about a second; `trainer` is checked against Lightning's own `Trainer` by
`src.preflight.check_trainer`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from src.adapt.config import ADAPT, check_compatible
from src.backbones.config import BACKBONES
from src.data.config import DATA
from src.finetune.config import FINETUNE
from src.regularization.config import RegularizationConfig
from src.schema import ConfigError, check, check_choice
from src.tasks.config import TASKS, refusals


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
    # In a grid or sweep, which jobs log their weights (model + checkpoint): `best`, a job that no finished sibling
    # beats on the objective (the winner always keeps its weights; the others skip a model export each); `all`.
    keep_models: str = "best"

    def __post_init__(self) -> None:
        check(self.keep_models in ("best", "all"), f"keep_models: best | all, got {self.keep_models!r}")
        check(
            self.register_model is None or self.log_model,
            "register_model: needs log_model=true (only a logged model can be registered)",
        )


def resolve_uri(uri: str, base: Path) -> str:
    """Make a relative sqlite/file store absolute against `base` (the launch directory)."""
    for scheme in ("sqlite:///", "file:"):
        if uri.startswith(scheme):
            path = uri[len(scheme) :]
            if path and not Path(path).is_absolute():
                return f"{scheme}{(base / path).resolve()}"
            return uri
    return uri if "://" in uri else str((base / uri).resolve())


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
    warmup_ratio: float = 0.1  # onecycle: the fraction spent ramping up (torch's pct_start)
    min_lr_ratio: float = 0.0
    onecycle_start_ratio: float = 0.04  # onecycle: LR at step 0 as a fraction of the peak (torch's 1/div_factor)
    lr_find: bool = False  # run the ratio-keeping LR finder before fit (src/lr_finder.py)
    lr_find_steps: int = 100
    lr_find_min_lr: float = 1.0e-6  # range of the swept base LR (`lr`); every group keeps its ratio to it
    lr_find_max_lr: float = 1.0
    lr_find_smoothing: float = 0.98  # EMA weight of the past in the smoothed loss curve
    lr_find_diverge: float = 4.0  # stop once the smoothed loss exceeds this multiple of its minimum
    lr_find_suggestion: str = "steepest"  # steepest | min_div_10
    lr_find_apply: bool = False  # train with the suggested base LR instead of `lr`

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
        check(
            0 < self.onecycle_start_ratio <= 1,
            f"onecycle_start_ratio: must be in (0, 1]; got {self.onecycle_start_ratio}",
        )
        check(self.lr_find_steps >= 2, f"lr_find_steps: must be >= 2; got {self.lr_find_steps}")
        check(
            0 < self.lr_find_min_lr < self.lr_find_max_lr,
            f"lr_find_min_lr/lr_find_max_lr: need 0 < min < max; got {self.lr_find_min_lr}, {self.lr_find_max_lr}",
        )
        check(0 <= self.lr_find_smoothing < 1, f"lr_find_smoothing: must be in [0, 1); got {self.lr_find_smoothing}")
        check(self.lr_find_diverge > 1, f"lr_find_diverge: must be > 1; got {self.lr_find_diverge}")
        check_choice(self.lr_find_suggestion, "lr_find_suggestion", ("steepest", "min_div_10"))


@dataclass
class CacheConfig:
    """The `cache` config block: the on-disk store of derived data (frozen-backbone features, ...)."""

    enabled: bool = True
    dir: str | None = None  # None: $TRANSFER_LAB_CACHE, else ~/.cache/transfer-lab
    # A run holds its feature entries in RAM; a frozen prefix's token states (tokens x hidden x 4 bytes) can exceed
    # it (100k documents x 512 tokens x 768 ~ 150 GB). Beyond this estimate the run trains uncached. None: no bound.
    max_memory_gb: float | None = 8.0
    # Entries a process keeps loaded for its next job (a grid's or sweep's jobs in one process); 0: none.
    warm_gb: float = 2.0

    def __post_init__(self) -> None:
        if self.warm_gb < 0:
            raise ValueError(f"warm_gb: must be >= 0, got {self.warm_gb}")
        if self.max_memory_gb is not None and self.max_memory_gb <= 0:
            raise ValueError(f"max_memory_gb: must be > 0 or null (no bound), got {self.max_memory_gb}")


@dataclass
class CVConfig:
    """k-fold cross-validation (`cv.folds=k cv.fold=i`): the validation split is fold i of k seeded, stratified
    folds of the training data, the rest trains; the test split is untouched. `-m cv.fold=range(k)` runs them all,
    and `src.compare` treats folds as replicates, paired by fold."""

    folds: int | None = None  # None: no cross-validation (a val_fraction of train, or the given val split)
    fold: int = 0

    def __post_init__(self) -> None:
        if self.folds is None:
            check(self.fold == 0, f"fold: {self.fold} given without cv.folds (set cv.folds=k)")
            return
        check(self.folds >= 2, f"folds: must be >= 2 or null; got {self.folds}")
        check(
            0 <= self.fold < self.folds,
            f"fold: must be in 0..{self.folds - 1} (cv.folds={self.folds}); got {self.fold}",
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
    cv: CVConfig
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
    """Parse every group into its schema; raise `ConfigError` naming the first bad key. Torch-free: the `trainer`
    arguments are checked against Lightning by `src.preflight.check_trainer`."""
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
    # Optional, so that the stored configs of runs made before k-fold existed still validate (resume, evaluate).
    cv = _parse("cv", lambda: OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(CVConfig), cfg.get("cv", {}))))
    if cv.folds is not None and (given := parsed["data"].val_source()) is not None:
        raise ConfigError(
            f"cv.folds: draws each validation fold from the training data, but {given} is set; drop it (or merge "
            "it into the training data) to cross-validate"
        )
    known = {*registries, *FIXED_GROUPS, "trainer", "seed", "ckpt_path", "resume", "cv"}
    extra = {k: cfg[k] for k in cfg if k not in known}
    return RunConfig(
        seed=seed,
        trainer=OmegaConf.to_container(cfg.trainer, resolve=True),
        ckpt_path=cfg.get("ckpt_path"),
        resume=None if cfg.get("resume") is None else str(cfg.get("resume")),
        extra=extra,
        cv=cv,
        **parsed,
    )
