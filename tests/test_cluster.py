"""The cluster path for real (slow): sweeps through `hydra/launcher=slurm_cpu` on a single-node SLURM cluster with
accounting, started on loopback by tests/cluster/setup_slurm.sh (apt-installs it where it is missing), with Optuna on
PostgreSQL and MLflow as a tracking server backed by PostgreSQL with its own artifact root.

    python -m pytest -m slow tests/test_cluster.py -s     # root + apt, or SLURM already running; else skipped

Each test checks the stores it leaves: every trial finished once, one MLflow child run per trial with a final status.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from src.sweep.storage import load_study
from tests.cluster.services import mlflow_server, postgres, slurm_cluster
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.slow
EPOCHS = 2  # the digits transfer: two small batches an epoch


@dataclass
class Services:
    optuna: str  # PostgreSQL URL of the Optuna database
    mlflow: str  # the MLflow tracking server


@pytest.fixture(scope="module")
def cluster() -> None:
    slurm_cluster()


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    root = tmp_path_factory.mktemp("services")
    with postgres("optuna", "mlflow") as pg, mlflow_server(f"{pg}/mlflow", root / "artifacts") as url:
        yield Services(optuna=f"{pg}/optuna", mlflow=url)


def sweep_args(tmp: Path, services: Services, study: str, *more: str) -> list[str]:
    """A digits_lr sweep named `study`, on the shared PostgreSQL + MLflow server, outputs under tmp."""
    return [
        "-m",
        "sweep=digits_lr",
        f"sweep.study_name={study}",
        f"sweep.storage={services.optuna}",
        f"tracking.uri={services.mlflow}",
        "tracking.artifact_location=null",  # the server's artifact root
        f"tracking.experiment={study}",
        f"hydra.sweep.dir={tmp / 'multirun'}",
        "sweep.heartbeat_interval=2",
        "sweep.grace_period=60",
        f"trainer.max_epochs={EPOCHS}",
        *more,
    ]


def sweep(tmp: Path, services: Services, study: str, *more: str) -> float:
    """Runs the sweep to its end; returns its wall time in seconds."""
    tmp.mkdir(parents=True, exist_ok=True)
    start = time.time()
    proc = run_cli(sweep_args(tmp, services, study, *more), tmp, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return time.time() - start


def runs(services: Services, study: str) -> tuple[Run, list[Run]]:
    """(the sweep's parent run, every other run of its experiment)."""
    client = MlflowClient(services.mlflow)
    experiment = client.get_experiment_by_name(study)
    all_runs = client.search_runs([experiment.experiment_id], max_results=1000)
    (parent,) = [r for r in all_runs if r.data.tags.get("optuna_role") == "study"]
    return parent, [r for r in all_runs if r.info.run_id != parent.info.run_id]


def check_complete(services: Services, study: str, n: int) -> optuna.Study:
    """Every trial finished once, one FINISHED child run per trial with its state, the best trial named."""
    s = load_study(study, services.optuna)
    assert [t.number for t in s.trials] == list(range(n)), "no trial lost, none duplicated"
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in s.trials), [t.state for t in s.trials]
    parent, children = runs(services, study)
    assert parent.info.status == "FINISHED" and parent.data.tags["best_trial"] == str(s.best_trial.number)
    by_trial = {int(c.data.tags["optuna_trial"]): c for c in children}
    assert len(children) == n and sorted(by_trial) == list(range(n)), "one run per trial"
    for t in s.trials:
        child = by_trial[t.number]
        assert child.info.status == "FINISHED" and child.data.tags["optuna_state"] == t.state.name
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert t.user_attrs["mlflow_run_id"] == child.info.run_id
    return s


def test_gpu_preset_on_a_cpu_node_fails_at_once_naming_the_keys(cluster: None, tmp_path: Path) -> None:
    start = time.time()
    proc = run_cli(["-m", "sweep=digits_lr", "hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path / 'm'}"], tmp_path)
    wall = time.time() - start
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
    for key in ("gpus_per_node", "cpus_per_task", "mem_gb", "partition"):
        assert f"hydra.launcher.{key}" in line, line
    assert "hydra/launcher=slurm_cpu" in line
    assert not (tmp_path / "optuna.journal").exists(), "nothing asked, nothing submitted"
    print(json.dumps({"gpu_preset_on_cpu_node_s": round(wall, 1), "load": os.getloadavg()[0]}))


def test_slurm_array_sweep_vs_basic_launcher(cluster: None, services: Services, tmp_path: Path) -> None:
    """SLURM job arrays (2 at a time) writing to PostgreSQL and the MLflow server; the same sweep in-process."""
    n = 4
    slurm_s = sweep(tmp_path / "slurm", services, "slurm-array", "hydra/launcher=slurm_cpu", f"sweep.n_trials={n}")
    check_complete(services, "slurm-array", n)
    jobs = slurm_jobs(tmp_path / "slurm" / "multirun")
    assert len(jobs) == n, f"every trial ran as a job array task: {jobs}"
    basic_s = sweep(tmp_path / "basic", services, "basic", f"sweep.n_trials={n}")
    check_complete(services, "basic", n)
    figures = {"trials": n, "slurm_array_s": round(slurm_s), "basic_s": round(basic_s)}
    figures |= {"slurm_trials_per_h": round(3600 * n / slurm_s), "basic_trials_per_h": round(3600 * n / basic_s)}
    print(json.dumps({**figures, "load": os.getloadavg()[0]}))


def test_joblib_workers_lose_nothing_on_postgres_and_the_mlflow_server(services: Services, tmp_path: Path) -> None:
    sweep(tmp_path, services, "joblib", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "sweep.n_trials=4")
    check_complete(services, "joblib", 4)


def slurm_jobs(multirun: Path) -> list[str]:
    folder = multirun / ".submitit"
    return sorted(p.name for p in folder.glob("*_*") if p.is_dir()) if folder.is_dir() else []


def reported(services: Services, study: str) -> dict[int, int]:
    """{trial number: validations reported} of the study's RUNNING trials."""
    try:
        s = load_study(study, services.optuna)
    except KeyError:
        return {}
    return {t.number: len(t.intermediate_values) for t in s.get_trials(states=(TrialState.RUNNING,))}


def test_requeued_trial_resumes_its_run_and_a_cancelled_one_fails(
    cluster: None, services: Services, tmp_path: Path
) -> None:
    """Trials 0 and 1 run as one array; mid-training job 0 is requeued (as on preemption) and job 1 cancelled.
    Trial 0 resumes from its checkpoint in the same MLflow run and completes once; trial 1 fails; trial 2 runs."""
    study, epochs = "preempt", 12
    args = sweep_args(tmp_path, services, study, "hydra/launcher=slurm_cpu", "sweep.n_trials=3", "sweep.pruner=none")
    cmd = [sys.executable, "-m", "src.run", *args, f"trainer.max_epochs={epochs}", "trainer.enable_progress_bar=false"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    with open(tmp_path / "sweep.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while not (len(progress := reported(services, study)) == 2 and min(progress.values()) >= 2):
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "sweep.log").read_text()[-3000:]
            time.sleep(1)
        first, second = slurm_jobs(tmp_path / "multirun")[:2]  # array tasks 0 and 1 run trials 0 and 1
        subprocess.run(["scontrol", "requeue", first], check=True)
        subprocess.run(["scancel", second], check=True)
        while "BeginTime" not in subprocess.run(["squeue", "-h", "-j", first, "-o", "%r"], capture_output=True,
                                                text=True).stdout:  # fmt: skip
            time.sleep(1)
        subprocess.run(["scontrol", "update", f"JobId={first}", "StartTime=now"], check=True)  # skip the 2 min wait
        assert proc.wait(timeout=480) == 0, (tmp_path / "sweep.log").read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    s = load_study(study, services.optuna)
    states = {t.number: t.state for t in s.trials}
    assert states == {0: TrialState.COMPLETE, 1: TrialState.FAIL, 2: TrialState.COMPLETE}, "none lost, none twice"
    steps = sorted(s.trials[0].intermediate_values)  # one validation may be lost or redone around the stop
    assert steps == list(range(len(steps))) and abs(len(steps) - epochs) <= 1, f"reported once each: {steps}"
    assert "CANCELLED" in s.trials[1].user_attrs["error"]
    parent, children = runs(services, study)
    by_trial: dict[int, list[Run]] = {}
    for child in children:
        by_trial.setdefault(int(child.data.tags["optuna_trial"]), []).append(child)
    (resumed,), (cancelled,), (third,) = by_trial[0], by_trial[1], by_trial[2]
    assert resumed.info.status == "FINISHED" and resumed.data.tags.get("resumed") == "true"
    assert resumed.data.tags["optuna_state"] == "COMPLETE"
    history = MlflowClient(services.mlflow).get_metric_history(resumed.info.run_id, "val/acc")
    logged = sorted(m.step for m in history)  # the epoch stopped mid-way is resumed without its validation
    assert len(set(logged)) == len(logged) and len(set(range(epochs)) - set(logged)) <= 1, logged
    assert cancelled.info.status == "KILLED" and cancelled.data.tags["optuna_state"] == "FAIL"
    assert third.info.status == "FINISHED" and parent.info.status == "FINISHED"


def test_without_accounting_the_sweep_ends_at_once_with_the_reason(cluster: None, tmp_path: Path) -> None:
    """Without slurmdbd, `sacct` cannot say how a job ended, so a job dying without a result would be waited for
    forever: the launcher refuses to start, in one line. (slurmdbd is started again afterwards.)"""
    pid = int(Path("/run/slurmdbd.pid").read_text())
    os.kill(pid, signal.SIGTERM)
    try:
        while Path(f"/proc/{pid}").exists():
            time.sleep(0.2)
        args = ["-m", "sweep=digits_lr", "hydra/launcher=slurm_cpu", f"hydra.sweep.dir={tmp_path / 'm'}"]
        proc = run_cli(args, tmp_path)
    finally:
        slurm_cluster()
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
    assert "SLURM accounting does not answer" in line and "slurmdbd" in line, line
    assert not (tmp_path / "optuna.journal").exists(), "nothing asked, nothing submitted"
