"""The sweep's MLflow parent run: settings as params, progress as metrics, results and Optuna plots as artifacts.

It is found again by its study tag on relaunch, so a resumed study keeps one parent with all its children.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import optuna
from mlflow.entities import RunStatus
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from src.sweep.config import describe
from src.sweep.schema import SweepConfig
from src.sweep.trial import MLFLOW_RUN_ATTR, ROLE_TAG, STATE_TAG, STORAGE_TAG, STUDY_TAG, TRIAL_TAG
from src.tracking import MLflowRun

log = logging.getLogger(__name__)


class StudyRun(MLflowRun):
    """MLflowRun that reuses the parent run of an earlier launch of the same study (same name and storage)."""

    def __enter__(self) -> StudyRun:
        study, storage = self.tags[STUDY_TAG], self.tags[STORAGE_TAG]
        self.experiment_id = self._experiment_id()
        found = self.client.search_runs(
            [self.experiment_id],
            f"tags.{STUDY_TAG} = '{study}' and tags.{STORAGE_TAG} = '{storage}' and tags.{ROLE_TAG} = 'study'",
            max_results=1,
        )
        if found:
            self.run_id = found[0].info.run_id  # reopened by MLflowRun, with this launch's commit and multirun dir
            log.info("Resuming study %r: MLflow parent run %s", study, self.run_id)
        super().__enter__()
        return self

    def log_new_params(self, params: Mapping[str, str]) -> None:
        """MLflow params are immutable: on resume keep the first values and say which settings changed."""
        existing = self.client.get_run(self.run_id).data.params
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
        if changed:
            log.warning("Sweep settings changed since the study started (MLflow keeps the first): %s", changed)
        self.log_params({k: v for k, v in params.items() if k not in existing})

    def sync_children(self, study: optuna.Study) -> None:
        """Children still RUNNING whose trial has ended (a killed worker) get the trial's state and end; children
        stopped by a signal (KILLED, e.g. a cancelled SLURM job) or already ended FAILED as orphans by the next
        run's liveness check get the trial's final state as a tag."""
        states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
        children = self.client.search_runs(
            [self.experiment_id],
            f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.run_id}' and attributes.status != 'FINISHED'",
        )
        for child in children:
            state = states.get(int(child.data.tags.get(TRIAL_TAG, -1)))
            if state is None or not state.is_finished() or child.data.tags.get(STATE_TAG) == state.name:
                continue
            self.client.set_tag(child.info.run_id, STATE_TAG, state.name)
            if child.info.status == "RUNNING":
                status = RunStatus.FAILED if state == TrialState.FAIL else RunStatus.FINISHED
                self.client.set_terminated(child.info.run_id, RunStatus.to_string(status))

    def log_progress(self, study: optuna.Study, metrics: list[str]) -> None:
        """Trial counts and the best so far (Pareto front size for several objectives), step = finished trials."""
        trials = study.get_trials(deepcopy=False)
        counts = Counter(t.state for t in trials)
        finished = sum(n for state, n in counts.items() if state.is_finished())
        progress = {f"trials_{s.name.lower()}": float(counts[s]) for s in TrialState if s != TrialState.WAITING}
        if counts[TrialState.COMPLETE]:
            best = study.best_trials
            if len(metrics) == 1:
                progress["best_value"] = best[0].value
                run_id = best[0].user_attrs.get(MLFLOW_RUN_ATTR, "")
                params = {f"best.{k}": v for k, v in best[0].params.items()}
                self.set_tags({"best_trial": best[0].number, "best_trial_run_id": run_id, **params})
            else:
                progress["pareto_front_size"] = float(len(best))
        self.log_metrics(progress, step=finished)

    def log_results(self, study: optuna.Study, metrics: list[str]) -> None:
        """Trials table, best trial(s) as JSON and the Optuna plots (those the study has enough data for)."""
        trials = study.get_trials(deepcopy=False)
        self.log_text(study.trials_dataframe().to_csv(index=False), "study/trials.csv")
        if any(t.state == TrialState.COMPLETE for t in trials):
            name = "study/best.json" if len(metrics) == 1 else "study/pareto_front.json"
            self.log_dict({"metrics": metrics, "trials": [_summary(t) for t in study.best_trials]}, name)
        for name, plot, kwargs in _plots(metrics):
            self._log_plot(study, name, plot, kwargs)

    def _log_plot(self, study: optuna.Study, name: str, plot: Callable[..., Any], kwargs: dict[str, Any]) -> None:
        import matplotlib.pyplot as plt

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "experimental" and "too few trials" notices
                axes = plot(study, **kwargs)
        except (ValueError, RuntimeError, ZeroDivisionError) as e:  # e.g. importances need 2+ complete trials
            log.info("No %s plot: %s", name, e)
            return
        figure = np.atleast_1d(axes).flat[0].figure
        figure.set_size_inches(9, 6)
        figure.tight_layout()
        self.log_figure(figure, f"plots/{name}.png")
        plt.close(figure)


def _summary(trial: FrozenTrial) -> dict[str, Any]:
    return {"number": trial.number, "values": trial.values, "params": trial.params}


def _plots(metrics: list[str]) -> list[tuple[str, Callable[..., Any], dict[str, Any]]]:
    """(artifact name, plot function, kwargs): per objective for several objectives, plus the Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as vis

    if len(metrics) == 1:
        targets = [("", {})]
    else:
        targets = [
            (f"_{i}", {"target": lambda t, i=i: t.values[i], "target_name": metric}) for i, metric in enumerate(metrics)
        ]
    plots = [
        (f"{name}{suffix}", fn, kwargs)
        for suffix, kwargs in targets
        for name, fn in (
            ("history", vis.plot_optimization_history),
            ("parallel_coordinate", vis.plot_parallel_coordinate),
            ("param_importances", vis.plot_param_importances),
        )
    ]
    if len(metrics) == 1:
        plots.append(("intermediate_values", vis.plot_intermediate_values, {}))
    else:
        plots.append(("pareto_front", vis.plot_pareto_front, {"target_names": metrics}))
    return plots


def study_params(
    settings: SweepConfig,
    space: Mapping[str, BaseDistribution],
    when: Mapping[str, Mapping[str, list[Any]]],
    **more: Any,
) -> dict[str, str]:
    """Flat MLflow params of a sweep, all under `sweep.` so they never read as a run's own (`seed`, ...): sampler
    and pruner with their arguments (`sweep.sampler.multivariate`, ...), `sweep.space.<key>` per dimension (with
    its condition), the run-time settings, and `more` (storage, n_trials...)."""
    out = {
        f"space.{k}": describe(d) + "".join(f" if {c} in {v}" for c, v in when.get(k, {}).items())
        for k, d in space.items()
    }
    for role in ("sampler", "pruner"):
        name = getattr(settings, role)
        out[role] = name
        out |= {f"{role}.{k}": str(v) for k, v in settings.kwargs.get(name, {}).items()}
    for key in ("seed", "max_retry", "heartbeat_interval", "grace_period"):
        out[key] = str(getattr(settings, key))
    return {f"sweep.{k}": v for k, v in (out | {k: str(v) for k, v in more.items()}).items()}
