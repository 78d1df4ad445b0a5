"""The sweeper's loop: ask trials in batches, launch them as Hydra jobs, keep the study and MLflow consistent.

Trials live in the storage only: a job learns its trial number from its overrides and tells its own result
(`src.sweep.trial`), so basic, joblib and submitit (local or SLURM) workers behave the same, and a relaunch
resumes the study: finished trials are kept, trials of dead workers are failed by heartbeat and retried.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override, Quote, QuotedString, RangeSweep
from hydra.core.utils import JobReturn
from hydra.errors import HydraException
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import FrozenTrial, TrialState

from src.config import RunConfig, validate
from src.schema import ConfigError
from src.sweep import config as sweep_config
from src.sweep.schema import SweepConfig, SweepError
from src.sweep.storage import Heartbeat, display_url, hand_over_password, open_storage, resolve, url_password
from src.sweep.tracking import StudyRun, study_params
from src.sweep.trial import ERROR_ATTR, ROLE_TAG, STORAGE_TAG, STUDY_TAG, TRIAL_TAG
from src.tracking.mlflow_run import git_commit
from src.tracking.summary import summarize_children

log = logging.getLogger(__name__)

PARENT_RUN_ATTR = "mlflow_parent_run_id"
SET_BY_SWEEPER = ("sweep.trial", "sweep.study_name", "sweep.storage", "tracking.parent_run_id")


def override_value(value: Any) -> str:
    """A sampled value as the right-hand side of a Hydra override (strings quoted, so any text survives)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return QuotedString(value, Quote.single).with_quotes()
    return repr(value)


def cli_distribution(override: Override) -> BaseDistribution:
    """Command-line dimensions, as Hydra's optuna sweeper reads them: `a,b` / `choice(a,b)` categorical,
    `range(lo,hi[,step])` int (hi excluded), `interval(lo,hi)` float, `tag(log,interval(..))` log scale."""
    value = override.value()
    if override.is_choice_sweep() or (isinstance(value, RangeSweep) and value.shuffle):
        return CategoricalDistribution(list(override.sweep_iterator()))
    if isinstance(value, RangeSweep):
        if all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
            return IntDistribution(value.start, value.stop - 1, step=value.step)
        return CategoricalDistribution(list(override.sweep_iterator()))
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if "int" in value.tags:
            return IntDistribution(int(value.start), int(value.end), log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise SweepError(f"{override.key_or_group}: unsupported sweep {override.input_line!r}")


def checked_distribution(override: Override) -> BaseDistribution:
    """`cli_distribution`, with Optuna's refusal of a range (e.g. a log scale from 0) said as the user's mistake."""
    try:
        return cli_distribution(override)
    except ValueError as e:
        raise SweepError(f"{override.key_or_group}: {override.input_line!r} is not a valid search range: {e}") from None


class StudySweep:
    """One launch of a sweep: resumes (or creates) the study and runs trials until it holds `n_trials`."""

    def __init__(self, config: DictConfig, launcher: Launcher, config_loader: Any, arguments: list[str]) -> None:
        self.config, self.launcher, self.config_loader = config, launcher, config_loader
        if config.get("sweep") is None:
            raise SweepError("hydra/sweeper=optuna_study needs a sweep: python -m src.run -m sweep=NAME")
        self.settings: SweepConfig = sweep_config.load(config.sweep)
        self.run_cfg: RunConfig = validate(config)
        self.launch_dir = Path(config.hydra.runtime.cwd)
        self.metrics = self.run_cfg.objective.metrics
        if len(self.metrics) > 1 and self.settings.pruner != "none":
            raise SweepError("sweep.pruner: Optuna prunes single-objective studies only; use sweep.pruner=none")
        self.name = self.settings.study_name or config.hydra.runtime.choices.get("sweep")
        url = resolve(self.settings.storage, self.run_cfg.tracking.uri, self.launch_dir)
        self.url = hand_over_password(url)
        self.forget_password(config, url_password(url))
        self.split_arguments(arguments)
        sweep_config.check_fold_dimension(self.space, self.settings)
        self.when = sweep_config.conditions(self.settings.params)
        self.n_trials = self.count_trials()

    def forget_password(self, config: DictConfig, secret: str | None) -> None:
        """The sweep's own config (saved as multirun.yaml and sweep.yaml, composed into every job) with the storage
        URL that `hand_over_password` moved the password out of, and no other trace of it (the overrides, Hydra's
        override_dirname)."""
        with open_dict(config):
            if config.sweep.get("storage") is not None:
                config.sweep.storage = self.url
            if secret:
                job = config.hydra.job
                job.override_dirname = job.override_dirname.replace(secret, "***")
                task = config.hydra.overrides.task
                for i, override in enumerate(task):
                    task[i] = override.replace(secret, "***")

    def split_arguments(self, arguments: list[str]) -> None:
        """Command-line overrides: plain ones go to every job (and fix a swept key), sweeps become dimensions."""
        parsed = OverridesParser.create(config_loader=self.config_loader).parse_overrides(arguments)
        fixed = [o for o in parsed if not o.is_sweep_override() and o.key_or_group not in SET_BY_SWEEPER]
        dims = {o.key_or_group: checked_distribution(o) for o in parsed if o.is_sweep_override()}
        self.fixed = [o.input_line for o in fixed]
        self.fixed_values = {o.key_or_group: o.value() for o in fixed}
        space = sweep_config.search_space(self.settings.params)
        self.space = {k: d for k, d in space.items() if k not in self.fixed_values} | dims

    def count_trials(self) -> int:
        """`sweep.n_trials`; a grid runs each point once, so at most (and by default) the grid's size."""
        n = self.settings.n_trials
        if self.settings.sampler == "grid":
            if self.when:
                raise SweepError("sweep.sampler: a grid cannot enumerate a conditional space (params with when:)")
            return min(n or math.inf, sweep_config.grid_size(self.space))
        if n is None:
            raise SweepError("sweep.n_trials: required (except with the grid sampler, whose size it defaults to)")
        return n

    def n_jobs(self) -> int:
        """Trials per batch: `sweep.n_jobs`, else what the launcher runs at once (joblib n_jobs, SLURM array)."""
        if self.settings.n_jobs:
            return self.settings.n_jobs
        launcher = self.config.hydra.launcher
        n = launcher.get("n_jobs") or launcher.get("array_parallelism") or 1
        return n if n > 0 else max(1, (os.cpu_count() or 1) + 1 + n)  # joblib: -1 = all cores

    def create_study(self) -> optuna.Study:
        storage = open_storage(self.url, self.settings)
        try:  # shift a sampler seed by the trials so far, so a resumed sweep does not replay its first draws
            seen = len(optuna.load_study(study_name=self.name, storage=storage).get_trials(deepcopy=False))
        except KeyError:
            seen = 0
        study = optuna.create_study(
            study_name=self.name,
            storage=storage,
            sampler=sweep_config.sampler(self.settings, self.space, seen),
            pruner=sweep_config.pruner(self.settings),
            directions=self.run_cfg.objective.directions,
            load_if_exists=True,
        )
        wanted = [optuna.study.StudyDirection[d.upper()] for d in self.run_cfg.objective.directions]
        if study.directions != wanted:
            raise SweepError(
                f"study {self.name!r} in {display_url(self.url)} optimizes {[d.name for d in study.directions]}, "
                f"not {wanted}: set sweep.study_name to start a new study"
            )
        return study

    def run(self) -> list[Sequence[JobReturn]]:
        check = getattr(self.launcher, "preflight", None)  # a cluster launcher's request, before any trial exists
        if check is not None:
            check()
        n_jobs = self.n_jobs()
        study = self.create_study()
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        storage = display_url(self.url)
        log.info("Study %r in %s: %d trials, %d at a time", self.name, storage, self.n_trials, n_jobs)
        tags = {
            STUDY_TAG: self.name,
            STORAGE_TAG: storage,
            ROLE_TAG: "study",
            "git_commit": git_commit(self.launch_dir),
        }
        tags["multirun_dir"] = str(self.launch_dir / sweep_dir)
        returns: list[Sequence[JobReturn]] = []
        with StudyRun(self.run_cfg.tracking, self.launch_dir, f"sweep-{self.name}", tags) as parent:
            study.set_user_attr(PARENT_RUN_ATTR, parent.run_id)
            objective = self.run_cfg.objective
            params = study_params(
                self.settings,
                self.space,
                self.when,
                study_name=self.name,
                storage=storage,
                n_trials=self.n_trials,
                n_jobs=n_jobs,
                metrics=",".join(objective.metrics),
                directions=",".join(objective.directions),
            )
            parent.log_new_params(params)
            parent.log_text(OmegaConf.to_yaml(self.config.sweep), "sweep.yaml")
            while (batch := self.next_batch(study, parent, n_jobs)) is not None:
                if batch:
                    returns.append(self.launch(study, batch, parent.run_id))
                    parent.log_progress(study, self.metrics)
            parent.sync_children(study)
            parent.log_progress(study, self.metrics)
            parent.log_results(study, self.metrics)
            summarize_children(parent, objective.metric, objective.direction)  # table, best trial's run, terminal
        return returns

    def next_batch(self, study: optuna.Study, parent: StudyRun, n_jobs: int) -> list[optuna.Trial] | None:
        """Trials to launch now; `[]` = wait for other workers' trials; None = the study is done.

        Done means `n_trials` finished trials (a trial retried after its worker died counts once) and none
        running. A RUNNING trial of a dead worker is failed once its heartbeat is `grace_period` old.
        """
        fail_stale_trials(study)
        parent.sync_children(study)
        trials = study.get_trials(deepcopy=False)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        todo = self.n_trials - len(counted_trials(trials)) - running
        if todo > 0:
            return [self.ask(study) for _ in range(min(n_jobs, todo))]
        if running == 0:
            return None
        log.info("Waiting for %d running trial(s) of other workers (or dead ones, failed by heartbeat)", running)
        time.sleep(self.settings.heartbeat_interval)
        return []

    def ask(self, study: optuna.Study) -> optuna.Trial:
        trial = study.ask()
        sweep_config.suggest(trial, self.space, self.when, self.fixed_values)
        return trial

    def launch(self, study: optuna.Study, batch: list[optuna.Trial], parent_id: str) -> list:
        """Compose and validate each trial's job (a bad sampled value fails that trial only), launch the rest,
        and fail any trial whose job ended without telling its result (a crash before or outside the run)."""
        jobs, launched = [], []
        for trial in batch:
            overrides = [
                *self.fixed,
                *(f"{key}={override_value(value)}" for key, value in trial.params.items()),
                f"++sweep.trial={trial.number}",
                f"++sweep.study_name={override_value(self.name)}",
                f"++sweep.storage={override_value(self.url)}",
                # the child run is created already linked and tagged: even a job killed at once is found
                f"tracking.parent_run_id={parent_id}",
                f"++tracking.tags.{TRIAL_TAG}={override_value(str(trial.number))}",
                f"++tracking.tags.{STUDY_TAG}={override_value(self.name)}",
                f"++tracking.tags.{ROLE_TAG}=trial",
            ]
            try:
                job_cfg = self.config_loader.load_sweep_config(self.config, overrides)
                with open_dict(job_cfg):
                    del job_cfg["hydra"]
                validate(job_cfg)
            except (ConfigError, HydraException, OmegaConfBaseException) as e:
                fail(study, trial._trial_id, f"invalid config: {e}")
                continue
            jobs.append(overrides)
            launched.append(trial)
        if not jobs:
            return []
        storage = study._storage
        try:
            with Heartbeat(storage, [t._trial_id for t in launched], self.settings.heartbeat_interval):
                results = self.launcher.launch(jobs, initial_job_idx=launched[0].number)
        except ConfigError as e:  # the launcher refused the batch (a cluster that can never run it): none ran
            for trial in launched:
                if storage.get_trial(trial._trial_id).state == TrialState.RUNNING:
                    fail(study, trial._trial_id, f"not launched: {e}")
            raise
        for trial, result in zip(launched, results, strict=True):
            if storage.get_trial(trial._trial_id).state == TrialState.RUNNING:
                fail(study, trial._trial_id, f"the job ended without a result: {job_error(result)}")
        return results


def counted_trials(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The finished trials that count towards n_trials: one whose worker died counts once, through its retry."""
    retried = {n for t in trials for n in RetryHeartbeatStaleTrialCallback.retry_history(t)}
    return [t for t in trials if t.state.is_finished() and t.number not in retried]


def fail(study: optuna.Study, trial_id: int, error: str) -> None:
    log.warning("Trial %s failed: %s", study._storage.get_trial_number_from_id(trial_id), error)
    study._storage.set_trial_user_attr(trial_id, ERROR_ATTR, error[:2000])
    study.tell(study._storage.get_trial_number_from_id(trial_id), state=TrialState.FAIL)


def job_error(result: JobReturn) -> str:
    try:
        result.return_value  # noqa: B018 - raises the job's exception, if any
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "no exception"
