"""The `sweep` node's schema, kept free of Optuna imports: Hydra's plugin scan registers it at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from src.schema import ConfigError


class SweepError(ConfigError):
    """A sweep definition that cannot run; the message names the offending key."""


# name -> class in optuna.samplers / optuna.pruners
SAMPLERS = {
    "tpe": "TPESampler",  # multivariate: true, group: true, constant_liar: true for parallel jobs
    "gp": "GPSampler",
    "cmaes": "CmaEsSampler",
    "random": "RandomSampler",
    "grid": "GridSampler",  # the grid is the search space (choices, ints, floats with a step)
    "qmc": "QMCSampler",
    "nsga2": "NSGAIISampler",
    "nsga3": "NSGAIIISampler",
}
PRUNERS = {
    "median": "MedianPruner",
    "percentile": "PercentilePruner",
    "successive_halving": "SuccessiveHalvingPruner",
    "hyperband": "HyperbandPruner",
    "threshold": "ThresholdPruner",
    "none": "NopPruner",
}


@dataclass
class SweepConfig:
    """One Optuna study run as a Hydra multirun; see sweeps/README.md for every key."""

    study_name: str | None = None  # default: the sweep's name, so relaunching resumes it
    storage: str | None = None  # default: optuna.journal next to mlflow.db; a *.journal path or any RDB URL
    n_trials: int | None = None  # finished (COMPLETE/PRUNED/FAIL) trials the study should hold; grid: its size
    n_jobs: int | None = None  # trials launched together; default: the launcher's n_jobs/array_parallelism or 1
    sampler: str = "tpe"  # one of SAMPLERS
    pruner: str = "median"  # one of PRUNERS
    seed: int | None = None  # the sampler's seed
    kwargs: dict[str, Any] = field(default_factory=dict)  # sampler/pruner name -> its keyword arguments
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
            if getattr(self, key) not in choices:
                raise SweepError(f"sweep.{key}: one of {', '.join(choices)}; got {getattr(self, key)!r}")
        unknown = sorted(set(self.kwargs) - set(SAMPLERS) - set(PRUNERS))
        if unknown:
            raise SweepError(f"sweep.kwargs: keys are sampler or pruner names; got {unknown}")
