"""A job's side of an Optuna trial, reached only through the storage (so basic, joblib and submitit workers
all behave the same): report the objective every validation, stop training when pruned, tell the outcome.

The job tells its own result, so a finished trial is recorded even if the sweeper dies meanwhile.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import optuna
from lightning.pytorch.utilities import rank_zero_only
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from src.config import Objective
from src.schema import ConfigError
from src.sweep import config as sweep_config
from src.sweep.storage import Heartbeat, open_storage
from src.tracking import MLflowRun

STUDY_TAG = "optuna_study"
STORAGE_TAG = "optuna_storage"  # on the parent run, without password: a study is its name in its storage
TRIAL_TAG = "optuna_trial"
STATE_TAG = "optuna_state"
ROLE_TAG = "optuna_role"  # "study" on the sweep's parent run, "trial" on each job's run
MLFLOW_RUN_ATTR = "mlflow_run_id"
ERROR_ATTR = "error"
DIVERGENCE_METRIC = "val/loss"  # logged by every run; non-finite means the trial diverged


class PruningCallback(pl.Callback):
    """Reports the objective after each validation; when the pruner says so, stops training gracefully, so
    the job still ends normally (best checkpoint tested, MLflow FINISHED) and the trial is told PRUNED.

    Only global rank 0 holds the trial (`None` elsewhere); the decision is broadcast so DDP ranks stop together.
    """

    def __init__(self, trial: optuna.Trial | None, metric: str) -> None:
        self.trial = trial
        self.metric = metric
        self.step = 0  # validations so far: the pruners' resource axis (= epochs when validating once per epoch)
        self.pruned = False

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        for name in sorted({self.metric, DIVERGENCE_METRIC} & set(metrics)):
            if not math.isfinite(float(metrics[name])):
                raise FloatingPointError(f"{name} is {float(metrics[name])} at validation {self.step}: diverged")
        prune = False
        if self.trial is not None:
            self.trial.report(float(metrics[self.metric]), self.step)
            max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else math.inf
            last = trainer.current_epoch + 1 >= max_epochs and trainer.is_last_batch
            prune = not last and self.trial.should_prune()  # after the last validation there is nothing to save
        self.step += 1
        if trainer.strategy.broadcast(prune, src=0):
            self.pruned = True
            trainer.should_stop = True


class JobTrial:
    """The trial a job runs (`sweep.trial`, set by the sweeper), or a no-op outside Optuna sweeps."""

    def __init__(self, sweep: Any, objective: Objective) -> None:
        self.settings = sweep_config.load(sweep) if sweep is not None else None
        if self.settings is not None and self.settings.trial is None:
            raise ConfigError(
                "sweep: a sweep runs as an Optuna study: launch it with -m (python -m src.run -m sweep=NAME), "
                "and keep `- /optuna_sweep` in the sweep file's defaults (it selects the optuna_study sweeper)"
            )
        self.objective = objective
        self.pruning: PruningCallback | None = None
        self.values: list[float] | None = None
        self.study: optuna.Study | None = None

    def callbacks(self) -> list[pl.Callback]:
        return [self.pruning] if self.pruning else []

    def keeps_model(self, value: float | Sequence[float]) -> bool:
        """Whether the run logs its model: always outside sweeps; a trial only while no completed trial beats it
        (dominates it, with secondary objectives). The final best trial always does (nothing completed before it
        beat it), so a sweep keeps its winner's model at the cost of a few, not one per trial."""
        if self.study is None:
            return self.settings is None
        if self.pruning is not None and self.pruning.pruned:
            return False
        signs = [1.0 if d == "maximize" else -1.0 for d in self.objective.directions]
        mine = [s * float(v) for s, v in zip(signs, value if isinstance(value, Sequence) else [value], strict=True)]
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            theirs = [s * v for s, v in zip(signs, trial.values, strict=True)]
            if all(t >= m for t, m in zip(theirs, mine, strict=True)) and theirs != mine:
                return False
        return True

    def complete(self, value: float | Sequence[float]) -> float | Sequence[float]:
        """Record the run's objective value(s) for the trial; returns them unchanged."""
        values = [float(v) for v in (value if isinstance(value, Sequence) else [value])]
        if not all(math.isfinite(v) for v in values):
            raise FloatingPointError(f"objective {values}: not finite")
        self.values = values
        return value

    @contextmanager
    def running(self, tracker: MLflowRun) -> Iterator[JobTrial]:
        """Links the MLflow run and the trial and beats while the job runs; then tells COMPLETE (the value given
        to `complete`), PRUNED, or FAIL on any exception, which is re-raised so the MLflow run ends FAILED."""
        if self.settings is None:
            yield self
            return
        s = self.settings
        is_zero = rank_zero_only.rank == 0
        study = optuna.load_study(
            study_name=s.study_name,
            storage=open_storage(s.storage, s),
            sampler=optuna.samplers.RandomSampler(),  # the job never samples: its params came as overrides
            pruner=sweep_config.pruner(s),
        )
        storage = study._storage
        trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, s.trial)
        state = storage.get_trial(trial_id).state
        if state != TrialState.RUNNING:
            raise RuntimeError(f"trial {s.trial} of study {s.study_name} is {state.name}, not RUNNING: not rerun")
        if not self.objective.secondary:  # Optuna prunes single-objective studies only
            self.pruning = PruningCallback(optuna.Trial(study, trial_id) if is_zero else None, self.objective.metric)
        if not is_zero:
            yield self
            return
        self.study = study
        storage.set_trial_user_attr(trial_id, MLFLOW_RUN_ATTR, tracker.run_id)
        tracker.set_tags({STATE_TAG: "RUNNING"})  # the sweeper's overrides gave the run its trial and study tags
        try:
            with Heartbeat(storage, [trial_id], s.heartbeat_interval):
                yield self
            if self.values is None:
                raise RuntimeError("the run returned no objective value")
        except BaseException as e:
            storage.set_trial_user_attr(trial_id, ERROR_ATTR, f"{type(e).__name__}: {e}"[:2000])
            study.tell(s.trial, state=TrialState.FAIL)
            tracker.set_tags({STATE_TAG: TrialState.FAIL.name})
            if isinstance(e, KeyboardInterrupt):  # the worker was stopped, not the trial: retry it as a dead one's
                RetryHeartbeatStaleTrialCallback(max_retry=s.max_retry)(study, storage.get_trial(trial_id))
            raise
        if self.pruning is not None and self.pruning.pruned:
            study.tell(s.trial, state=TrialState.PRUNED)
            tracker.set_tags({STATE_TAG: TrialState.PRUNED.name, "pruned": "true"})
        else:
            study.tell(s.trial, self.values)
            tracker.set_tags({STATE_TAG: TrialState.COMPLETE.name})
