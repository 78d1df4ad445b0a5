"""Optuna sweeps end to end: `python -m src.run -m sweep=digits_lr ...` as a subprocess, checked through the real
Optuna storage and MLflow store it leaves in tmp_path (no mocks). Short runs: 3 epochs of the digits transfer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url

from src.sweep.config import (
    check_fold_dimension,
    conditions,
    grid_size,
    load,
    pruner,
    sampler,
    search_space,
    suggest,
)
from src.sweep.schema import PRUNERS, SAMPLERS, SweepConfig, SweepError
from src.sweep.storage import (
    PASSWORD_ENV,
    HeartbeatJournalStorage,
    display_url,
    hand_over_password,
    load_study,
    open_storage,
    url_password,
    with_password,
)
from src.sweep.study import checked_distribution, cli_distribution, counted_trials, override_value
from tests.cluster.services import postgres
from tests.conftest import REPO, run_cli

STUDY = "digits_lr"
SHORT = "trainer.max_epochs=3"  # digits_lr trains 6 epochs; tests need fewer
BEATS = ["sweep.heartbeat_interval=1", "sweep.grace_period=4"]  # a killed worker's trial is stale after 4 s


def isolated(tmp: Path, storage: str | None = None) -> list[str]:
    """Every store under tmp: MLflow db + artifacts, the Optuna storage, Hydra's multirun dir."""
    return [
        f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
        f"tracking.artifact_location={tmp / 'mlruns'}",
        f"sweep.storage={storage or tmp / 'optuna.journal'}",
        f"hydra.sweep.dir={tmp / 'multirun'}",
    ]


def sweep(tmp: Path, *args: str, storage: str | None = None) -> subprocess.CompletedProcess:
    proc = run_cli(["-m", f"sweep={STUDY}", *BEATS, *isolated(tmp, storage), *args], tmp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def study(tmp: Path, storage: str | None = None) -> optuna.Study:
    return load_study(STUDY, storage or str(tmp / "optuna.journal"))


def kill_after(tmp: Path, finished: int, *args: str, timeout: float = 300) -> dict[int, FrozenTrial]:
    """Start a sweep, SIGKILL it (no cleanup at all) once `finished` trials are done; returns those trials."""
    cmd = [sys.executable, "-m", "src.run", "-m", f"sweep={STUDY}", *BEATS, *isolated(tmp), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
            if (tmp / "optuna.journal").exists() and len(counted_trials(study(tmp).trials)) >= finished:
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    return {t.number: t for t in counted_trials(study(tmp).trials)}


def mlflow_runs(tmp: Path) -> tuple[Run, list[Run]]:
    """(the sweep's parent run, its child runs)."""
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("transfer-lab")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.optuna_role = 'study'")
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return parent, children


def test_pruning_sweep_records_complete_and_pruned_trials(tmp_path: Path) -> None:
    sweep(tmp_path, SHORT, "sweep.n_trials=6")
    trials = study(tmp_path).trials
    states = [t.state for t in trials]
    assert len(trials) == 6 and set(states) == {TrialState.COMPLETE, TrialState.PRUNED}, states
    epochs = {t.number: len(t.intermediate_values) for t in trials}
    assert all(epochs[t.number] == 3 for t in trials if t.state == TrialState.COMPLETE), epochs
    assert all(epochs[t.number] < 3 for t in trials if t.state == TrialState.PRUNED)

    parent, children = mlflow_runs(tmp_path)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    by_trial = {int(c.data.tags["optuna_trial"]): c for c in children}
    assert sorted(by_trial) == [t.number for t in trials], "one child run per trial"
    for t in trials:
        child = by_trial[t.number]
        assert child.info.status == "FINISHED" and child.data.tags["optuna_state"] == t.state.name
        assert child.data.tags.get("pruned") == ("true" if t.state == TrialState.PRUNED else None)
        assert float(child.data.params["optim.lr"]) == pytest.approx(t.params["optim.lr"])
        history = client.get_metric_history(child.info.run_id, "val/acc")
        assert len(history) == epochs[t.number], "the pruned job stopped training early"
        assert t.user_attrs["mlflow_run_id"] == child.info.run_id
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sweep.sampler"] == "tpe" and parent.data.params["sweep.pruner"] == "median"
    assert parent.data.params["sweep.space.optim.lr"] == "log-float[0.0001, 0.3]"
    best = study(tmp_path).best_trial
    assert parent.data.metrics["best_value"] == pytest.approx(best.value)
    assert parent.data.tags["best_trial"] == str(best.number)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {f"plots/{p}.png" for p in ("history", "parallel_coordinate", "param_importances")} <= artifacts
    assert "plots/intermediate_values.png" in artifacts
    # Trials log their model only while they are the best so far: the winner's is kept, no pruned trial's.
    with_model = {m.source_run_id for m in client.search_logged_models([parent.info.experiment_id])}
    assert by_trial[best.number].info.run_id in with_model
    assert not {by_trial[t.number].info.run_id for t in trials if t.state == TrialState.PRUNED} & with_model


def test_killed_sweep_resumes_and_keeps_finished_trials(tmp_path: Path) -> None:
    before = kill_after(tmp_path, 2, SHORT, "sweep.n_trials=4")
    assert len(before) >= 2, "the sweep should have finished two trials before the kill"

    sweep(tmp_path, SHORT, "sweep.n_trials=4")
    trials = study(tmp_path).trials
    assert len(counted_trials(trials)) == 4
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    for number, old in before.items():  # finished trials are kept as they were
        assert (trials[number].state, trials[number].params, trials[number].values) == (
            old.state,
            old.params,
            old.values,
        )
    killed = [t for t in trials if t.state == TrialState.FAIL]
    assert all(RetryHeartbeatStaleTrialCallback.retried_trial_number(t) is None for t in killed)
    retries = [t for t in trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) is not None]
    assert {RetryHeartbeatStaleTrialCallback.retried_trial_number(t) for t in retries} == {t.number for t in killed}

    parent, children = mlflow_runs(tmp_path)  # the relaunch reused the parent run
    assert parent.info.status == "FINISHED"
    assert not [c for c in children if c.info.status == "RUNNING"], "the killed trial's run is closed"
    assert {c.data.tags["optuna_state"] for c in children if c.info.status == "FAILED"} <= {"FAIL"}


def test_two_joblib_workers_share_one_sqlite_study(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    proc = sweep(
        tmp_path, SHORT, "sweep.n_trials=4", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", storage=storage
    )
    assert "database is locked" not in proc.stderr + proc.stdout
    assert "is launching 2 jobs" in proc.stdout + proc.stderr, "batches of two trials run in parallel"
    trials = study(tmp_path, storage).trials
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    _, children = mlflow_runs(tmp_path)
    assert sorted(int(c.data.tags["optuna_trial"]) for c in children) == [0, 1, 2, 3], "each trial recorded once"
    assert all(c.info.status == "FINISHED" for c in children)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL server (the machine's binaries, a temp data dir, a free port), if there is one."""
    with postgres("optuna") as server:
        yield f"{server}/optuna"


@pytest.mark.slow
def test_postgresql_storage_with_a_password_that_no_written_file_holds(tmp_path: Path, postgres_url: str) -> None:
    """The cluster recipe's storage, with parallel workers, on a server that asks for a password: the sweep
    completes (every job got the password), and the password is in no file the sweep wrote (outputs, multirun,
    MLflow artifacts and database) and on no line it printed."""
    password = make_url(postgres_url).password
    proc = sweep(
        tmp_path, SHORT, "sweep.n_trials=3", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", storage=postgres_url
    )
    trials = study(tmp_path, postgres_url).trials
    assert [t.number for t in trials] == [0, 1, 2]
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    parent, children = mlflow_runs(tmp_path)
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    assert parent.data.tags["optuna_storage"].startswith("postgresql+psycopg://postgres@localhost")
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) > 30 and any(p.name == "overrides.yaml" for p in written)
    assert [p for p in written if password.encode() in p.read_bytes()] == []
    assert password not in proc.stdout + proc.stderr
    assert "#0 : " in proc.stdout + proc.stderr, "the launcher printed the jobs' overrides"


def test_a_storage_password_travels_in_the_environment_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    url = "postgresql+psycopg://me:s3cr%40t@db:5432/optuna"
    bare = hand_over_password(url)
    assert bare == "postgresql+psycopg://me@db:5432/optuna"
    assert os.environ[PASSWORD_ENV] == "s3cr@t"
    assert make_url(with_password(bare)).password == "s3cr@t"
    assert display_url(with_password(bare)) == "postgresql+psycopg://me:***@db:5432/optuna"
    assert with_password("postgresql://me:other@db/x") == "postgresql://me:other@db/x", "a URL's own password wins"
    assert hand_over_password("/tmp/optuna.journal") == "/tmp/optuna.journal"
    assert url_password(url) == "s3cr%40t" and url_password(bare) is None and url_password("/x.journal") is None
    monkeypatch.delenv(PASSWORD_ENV)
    assert with_password(bare) == bare, "no password anywhere: libpq's PGPASSWORD / ~/.pgpass apply"


def test_failing_trials_are_recorded_and_the_sweep_completes(tmp_path: Path) -> None:
    # Grid over a diverging LR (NaN loss) and an invalid dropout (rejected by validation before launch).
    sweep(
        tmp_path,
        SHORT,
        "sweep.sampler=grid",
        "optim.lr=choice(0.02,1e20)",
        "regularization.head_dropout=choice(0.1,1.5)",
    )
    trials = study(tmp_path).trials
    assert len(trials) == 4
    outcome = {(t.params["optim.lr"], t.params["regularization.head_dropout"]): t for t in trials}
    assert outcome[(0.02, 0.1)].state == TrialState.COMPLETE
    assert outcome[(1e20, 0.1)].state == TrialState.FAIL
    assert "training diverged" in outcome[(1e20, 0.1)].user_attrs["error"]
    for lr in (0.02, 1e20):
        assert outcome[(lr, 1.5)].state == TrialState.FAIL
        assert "head_dropout" in outcome[(lr, 1.5)].user_attrs["error"]
    parent, children = mlflow_runs(tmp_path)
    assert parent.info.status == "FINISHED"
    status = {int(c.data.tags["optuna_trial"]): (c.info.status, c.data.tags["optuna_state"]) for c in children}
    assert status == {
        outcome[(0.02, 0.1)].number: ("FINISHED", "COMPLETE"),
        outcome[(1e20, 0.1)].number: ("FAILED", "FAIL"),
    }


def test_submitit_local_launcher_runs_trials_in_separate_processes(tmp_path: Path) -> None:
    """The SLURM code path (pickled launcher, jobs in fresh processes) with submitit's local executor."""
    sweep(tmp_path, SHORT, "sweep.n_trials=2", "sweep.n_jobs=2", "hydra/launcher=submitit_local")
    trials = study(tmp_path).trials
    assert len(trials) == 2 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    _, children = mlflow_runs(tmp_path)
    assert len(children) == 2 and len({c.data.tags["optuna_trial"] for c in children}) == 2
    assert list((tmp_path / "multirun" / ".submitit").iterdir()), "jobs ran through submitit"


def test_sweep_without_multirun_is_refused(tmp_path: Path) -> None:
    proc = run_cli([f"sweep={STUDY}", *isolated(tmp_path)], tmp_path)
    assert proc.returncode != 0 and "launch it with -m" in proc.stderr


def test_a_searched_fold_is_refused_before_any_trial(tmp_path: Path) -> None:
    """`cv.fold` as a dimension of a TPE study with pruning: exit 2 with what to do instead, and no trial."""
    from tests.test_cv import reviews

    text = ["data=text_table", f"data.train_path={reviews(tmp_path)}", "data.text_column=text", "backbone=minilm"]
    proc = run_cli(["-m", f"sweep={STUDY}", *isolated(tmp_path), *text, "cv.folds=3", "cv.fold=range(3)"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cv.fold: a fold is not a hyperparameter (the tpe sampler and median pruner" in proc.stderr
    assert not (tmp_path / "optuna.journal").exists()


# Pure helpers: fast, real Optuna / Hydra objects.


def test_folds_are_searchable_only_as_an_unpruned_grid() -> None:
    space = search_space({"optim.lr": [0.01, 0.1], "cv.fold": [0, 1, 2]})
    for settings in ({"sampler": "tpe", "pruner": "none"}, {"sampler": "grid", "pruner": "median"}):
        with pytest.raises(SweepError, match="cv.fold: a fold is not a hyperparameter"):
            check_fold_dimension(space, load(settings))
    check_fold_dimension(space, load({"sampler": "grid", "pruner": "none"}))  # every fold of every lr, alike
    check_fold_dimension(search_space({"optim.lr": [0.01, 0.1]}), load({}))  # a fixed fold is no dimension


def test_search_space_forms() -> None:
    space = search_space(
        {
            "finetune": ["full", "linear_probe"],
            "optim.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
            "trainer.max_epochs": {"type": "int", "low": 2, "high": 6, "step": 2},
            "regularization.head_dropout": {"type": "float", "low": 0.0, "high": 0.2, "step": 0.1},
        }
    )
    assert space["optim.lr"].log and space["trainer.max_epochs"].step == 2
    with pytest.raises(SweepError, match="grid sampler"):
        grid_size(space)
    del space["optim.lr"]
    assert grid_size(space) == 2 * 3 * 3
    with pytest.raises(SweepError, match=r"sweep.params.optim.lr"):
        search_space({"optim.lr": {"low": 1e-4, "high": 1e-1}})
    with pytest.raises(SweepError, match="sweep.sampler: one of"):
        load({"sampler": "annealing"})


def test_conditional_knobs_are_sampled_only_with_their_strategy() -> None:
    k = {"type": "int", "low": 1, "high": 3, "when": {"finetune": "partial"}}
    params = {"finetune": ["full", "partial"], "finetune.k": k}
    space, when = search_space(params), conditions(params)
    s = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, group=True, n_startup_trials=5))
    for _ in range(12):
        trial = s.ask()
        suggest(trial, space, when, fixed={})
        s.tell(trial, trial.params.get("finetune.k", 0))
    assert {t.params["finetune"] for t in s.trials} == {"full", "partial"}
    assert all(("finetune.k" in t.params) == (t.params["finetune"] == "partial") for t in s.trials)
    trial = s.ask()  # the strategy fixed on the command line still decides
    suggest(trial, {"finetune.k": space["finetune.k"]}, when, fixed={"finetune": "partial"})
    assert "finetune.k" in trial.params
    with pytest.raises(SweepError, match="listed before"):
        conditions({"finetune.k": k, "finetune": ["full", "partial"]})


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_builds_and_samples_the_space(name: str) -> None:
    space = search_space({"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "step": 1e-4}, "seed": [0, 1]})
    settings = load({"sampler": name, "seed": 0, "kwargs": {"tpe": {"multivariate": True}}})
    s = optuna.create_study(sampler=sampler(settings, space, seed_offset=3))
    for _ in range(3):
        trial = s.ask(space)
        s.tell(trial, trial.params["optim.lr"])
    assert all(set(t.params) == {"optim.lr", "seed"} for t in s.trials)


@pytest.mark.parametrize("name", sorted(PRUNERS))
def test_every_pruner_builds(name: str) -> None:
    settings = load({"pruner": name, "kwargs": {"threshold": {"lower": 0.1}, "percentile": {"percentile": 25.0}}})
    assert isinstance(pruner(settings), optuna.pruners.BasePruner)


def test_command_line_dimensions() -> None:
    lr, n, c = OverridesParser.create().parse_overrides(["lr=tag(log,interval(1e-4,1e-1))", "n=range(2,8)", "c=a,b"])
    assert cli_distribution(lr) == optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)
    assert cli_distribution(n) == optuna.distributions.IntDistribution(2, 7)
    assert cli_distribution(c) == optuna.distributions.CategoricalDistribution(["a", "b"])


def test_an_invalid_command_line_range_is_the_users_mistake() -> None:
    """A SweepError is a ConfigError: one line and exit 2 (src.errors), not the exit 1 of a bug."""
    (lr,) = OverridesParser.create().parse_overrides(["optim.lr=tag(log,interval(0.0,1.0))"])
    with pytest.raises(SweepError, match=r"optim.lr: .* is not a valid search range: .*low > 0"):
        checked_distribution(lr)


@pytest.mark.parametrize("value", ["full", "it's a \\ path: a=b,c", 0.1, 1e-20, 3, True, None])
def test_sampled_values_survive_hydra_override_parsing(value: object) -> None:
    (override,) = OverridesParser.create().parse_overrides([f"key={override_value(value)}"])
    assert override.value() == value


def test_journal_heartbeat_fails_a_silent_trial_and_queues_a_retry(tmp_path: Path) -> None:
    settings = SweepConfig(heartbeat_interval=1, grace_period=2)
    storage = open_storage(str(tmp_path / "s.journal"), settings)
    assert isinstance(storage, HeartbeatJournalStorage)
    s = optuna.create_study(study_name="s", storage=storage)
    alive, dead = s.ask({"x": optuna.distributions.FloatDistribution(0, 1)}), s.ask()
    storage.record_heartbeat(dead._trial_id)
    time.sleep(2.5)
    storage.record_heartbeat(alive._trial_id)
    optuna.storages.fail_stale_trials(s)
    states = [t.state for t in s.get_trials()]
    assert states == [TrialState.RUNNING, TrialState.FAIL, TrialState.WAITING]
    assert RetryHeartbeatStaleTrialCallback.retried_trial_number(s.trials[2]) == dead.number
