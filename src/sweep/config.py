"""The `sweep` node (one `sweeps/NAME.yaml`): its schema and the Optuna objects it names.

Sampler and pruner are `{name: ..., **kwargs}` so every keyword the Optuna class accepts works without a
schema change here; the search space maps config keys (the job's override keys) to distributions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution


class SweepError(ValueError):
    """A sweep definition that cannot run; the message names the offending key."""


SAMPLERS: dict[str, type[optuna.samplers.BaseSampler]] = {
    "tpe": optuna.samplers.TPESampler,  # multivariate: true, group: true, constant_liar: true for parallel jobs
    "gp": optuna.samplers.GPSampler,
    "cmaes": optuna.samplers.CmaEsSampler,
    "random": optuna.samplers.RandomSampler,
    "grid": optuna.samplers.GridSampler,  # the grid is the search space (choices, ints, floats with a step)
    "qmc": optuna.samplers.QMCSampler,
    "nsga2": optuna.samplers.NSGAIISampler,
    "nsga3": optuna.samplers.NSGAIIISampler,
}

PRUNERS: dict[str, type[optuna.pruners.BasePruner]] = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "threshold": optuna.pruners.ThresholdPruner,
    "none": optuna.pruners.NopPruner,
}


@dataclass
class SweepConfig:
    """One Optuna study run as a Hydra multirun; see sweeps/README.md for every key."""

    study_name: str | None = None  # default: the sweep's name, so relaunching resumes it
    storage: str | None = None  # default: optuna.journal next to mlflow.db; a *.journal path or any RDB URL
    n_trials: int | None = None  # finished (COMPLETE/PRUNED/FAIL) trials the study should hold; grid: its size
    n_jobs: int | None = None  # trials launched together; default: the launcher's n_jobs/array_parallelism or 1
    sampler: dict[str, Any] = field(default_factory=lambda: {"name": "tpe"})
    pruner: dict[str, Any] = field(default_factory=lambda: {"name": "median"})
    params: dict[str, Any] = field(default_factory=dict)  # config key -> [choices] | {type, low, high, ...}
    heartbeat_interval: int = 10  # seconds between "still alive" writes of a running trial
    grace_period: int = 60  # a RUNNING trial silent this long has a dead worker: FAIL, then retried
    max_retry: int = 1  # retries of a trial whose worker died (same params)
    trial: int | None = None  # set by the sweeper in each job's overrides: the trial this job runs

    def __post_init__(self) -> None:
        if self.n_trials is not None and self.n_trials < 1:
            raise SweepError(f"sweep.n_trials: must be >= 1; got {self.n_trials}")
        if self.n_jobs is not None and self.n_jobs < 1:
            raise SweepError(f"sweep.n_jobs: must be >= 1; got {self.n_jobs}")
        if not 0 < self.heartbeat_interval < self.grace_period:
            raise SweepError(
                f"sweep.grace_period ({self.grace_period}) must exceed sweep.heartbeat_interval "
                f"({self.heartbeat_interval}) > 0"
            )
        for key, choices in (("sampler", SAMPLERS), ("pruner", PRUNERS)):
            name = getattr(self, key).get("name")
            if name not in choices:
                raise SweepError(f"sweep.{key}.name: one of {', '.join(choices)}; got {name!r}")


def load(node: DictConfig | Mapping[str, Any]) -> SweepConfig:
    """Parse a composed `sweep` node (unknown keys and bad types are errors naming the key)."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SweepConfig), node))
    except Exception as e:  # OmegaConf's errors carry the key; keep only their first line
        raise SweepError(f"sweep: {str(e).splitlines()[0]}") from None


def distribution(key: str, spec: Any) -> BaseDistribution:
    """`[a, b]` or `{choices: [...]}` -> categorical; `{type: float|int, low, high, log?, step?}` -> numeric."""
    if isinstance(spec, list | tuple):
        spec = {"choices": spec}
    spec = dict(spec)
    try:
        if "choices" in spec:
            return CategoricalDistribution(list(spec.pop("choices")), **spec)
        kind = spec.pop("type", None)
        if kind == "float":
            return FloatDistribution(**spec)
        if kind == "int":
            return IntDistribution(**spec)
    except (TypeError, ValueError) as e:
        raise SweepError(f"sweep.params.{key}: {e}") from None
    raise SweepError(f"sweep.params.{key}: give choices (a list) or type: float|int with low and high; got {spec}")


def search_space(params: Mapping[str, Any]) -> dict[str, BaseDistribution]:
    return {key: distribution(key, spec) for key, spec in params.items()}


def grid(space: Mapping[str, BaseDistribution]) -> dict[str, list[Any]]:
    """Every value of every dimension; floats need a step, since a grid cannot enumerate an interval."""
    out: dict[str, list[Any]] = {}
    for key, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            out[key] = list(dist.choices)
        elif isinstance(dist, IntDistribution) and not dist.log:
            out[key] = list(range(dist.low, dist.high + 1, dist.step))
        elif isinstance(dist, FloatDistribution) and dist.step is not None:
            n = int(math.floor((dist.high - dist.low) / dist.step + 1e-9)) + 1
            out[key] = [dist.low + i * dist.step for i in range(n)]
        else:
            raise SweepError(f"sweep.params.{key}: the grid sampler needs choices, linear ints or a float step")
    return out


def grid_size(space: Mapping[str, BaseDistribution]) -> int:
    return math.prod(len(values) for values in grid(space).values())


def sampler(spec: Mapping[str, Any], space: Mapping[str, BaseDistribution], seed_offset: int) -> Any:
    """The sampler; a seed is shifted by the trials already in the study so a resumed sweep draws new points."""
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    if kwargs.get("seed") is not None:
        kwargs["seed"] += seed_offset
    if spec["name"] == "grid":
        kwargs["search_space"] = grid(space)
    return _instantiate("sampler", SAMPLERS[spec["name"]], kwargs)


def pruner(spec: Mapping[str, Any]) -> optuna.pruners.BasePruner:
    return _instantiate("pruner", PRUNERS[spec["name"]], {k: v for k, v in spec.items() if k != "name"})


def _instantiate(key: str, cls: type, kwargs: dict[str, Any]) -> Any:
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, ImportError) as e:
        raise SweepError(f"sweep.{key}: {cls.__name__}({', '.join(kwargs)}): {e}") from None


def describe(dist: BaseDistribution) -> str:
    """Short, readable form for MLflow params: `log-float[0.0001, 0.1]`, `int[3, 6] step 1`, `{a, b}`."""
    if isinstance(dist, CategoricalDistribution):
        return "{" + ", ".join(map(str, dist.choices)) + "}"
    kind = ("log-" if dist.log else "") + ("int" if isinstance(dist, IntDistribution) else "float")
    step = f" step {dist.step}" if dist.step not in (None, 1) else ""
    return f"{kind}[{dist.low}, {dist.high}]{step}"
