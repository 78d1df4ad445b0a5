"""The MLflow side of a run: naming, params, tags, status and artifacts.

We create the run ourselves (rather than letting Lightning's logger do it) so that a crash before,
during or after `fit` still ends in a FAILED run holding the error, and so that a sweep can nest
trial runs under a parent.
"""

from __future__ import annotations

import functools
import getpass
import json
import os
import subprocess
import tempfile
import time
import traceback
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import mlflow
from filelock import FileLock
from lightning.pytorch.loggers import MLFlowLogger
from mlflow.entities import Metric, Param, RunStatus, RunTag, SourceType
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import (
    MLFLOW_GIT_COMMIT,
    MLFLOW_PARENT_RUN_ID,
    MLFLOW_RUN_NOTE,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
    MLFLOW_USER,
)

from src.config import TrackingConfig, resolve_uri
from src.signals import STOP, Stopped
from src.tracking.liveness import Heartbeat, process_tags, reap_dead_runs
from src.tracking.plots import plt

MAX_PARAM_LENGTH = 6000


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """`{"optim": {"lr": 1e-3}}` -> `{"optim.lr": "0.001"}`; lists stay one JSON-ish value; None values omitted."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if value is None:  # unset: omitted, never the string "None"
            continue
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:MAX_PARAM_LENGTH]
    return out


def git_commit(cwd: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def source_tags(command: str) -> dict[str, str]:
    """Our `git_commit` tag and MLflow's standard source/commit/user tags (the runs table's Source and User
    columns) for a run started by `command`."""
    commit = git_commit(Path(__file__).parent)
    return {
        "git_commit": commit,
        MLFLOW_SOURCE_NAME: command,
        MLFLOW_SOURCE_TYPE: SourceType.to_string(SourceType.LOCAL),
        MLFLOW_GIT_COMMIT: commit,
        MLFLOW_USER: getpass.getuser(),
    }


def store_lock(uri: str) -> AbstractContextManager:
    """Serialises first contact with a local SQLite store: MLflow creates/migrates its tables on first use, and
    two processes doing that at once (parallel jobs, two runs started together) corrupt the schema migration."""
    if not uri.startswith("sqlite:///"):
        return nullcontext()
    return FileLock(uri[len("sqlite:///") :] + ".lock")


RUN_ENV = "TRANSFER_LAB_RUN_ID"  # the run rank 0 opened; the ranks DDP relaunches (they inherit it) attach to it


def launch_rank() -> int:
    """This process's rank in a multi-process launch, 0 outside one: torchrun's RANK, srun's SLURM_PROCID (several
    tasks), or Lightning's DDP relaunch of the script (LOCAL_RANK / NODE_RANK, unset in the launching process)."""
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"])
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"])
    return int(env.get("LOCAL_RANK", "0")) + int(env.get("NODE_RANK", "0"))


F = TypeVar("F", bound=Callable[..., None])


def leader_only(method: F) -> F:
    """A write to the run that only rank 0 makes, so a DDP launch records one run, logged once."""

    @functools.wraps(method)
    def write(self: MLflowRun, *args: Any, **kwargs: Any) -> None:
        if self.leader:
            method(self, *args, **kwargs)

    return write  # type: ignore[return-value]


class MLflowRun:
    """Context manager around one MLflow run; ends it FAILED (with the traceback) on any exception.

    Under DDP every rank runs the job; only rank 0 (the leader) creates, writes and ends the run. The other ranks
    attach to its id (Lightning's relaunch inherits it through RUN_ENV) and write nothing."""

    def __init__(
        self,
        cfg: TrackingConfig,
        base_dir: Path,
        run_name: str,
        tags: dict[str, str],
        resume_run_id: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.uri = resolve_uri(cfg.uri, base_dir)
        self.artifact_location = (
            Path(base_dir, cfg.artifact_location).resolve().as_uri() if cfg.artifact_location else None
        )
        self.run_name = run_name
        self.tags = {**tags, **cfg.tags}
        with store_lock(self.uri):  # the client creates/migrates a new store's tables right here
            self.client = MlflowClient(self.uri)
        self.run_id = resume_run_id or ""  # resuming: the same run continues
        self.heartbeat: Heartbeat | None = None
        self.leader = launch_rank() == 0

    def _experiment_id(self) -> str:
        experiment = self.client.get_experiment_by_name(self.cfg.experiment)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(self.cfg.experiment, self.artifact_location)
        except mlflow.exceptions.MlflowException:  # created meanwhile by a parallel worker
            return self.client.get_experiment_by_name(self.cfg.experiment).experiment_id

    def __enter__(self) -> MLflowRun:
        self.experiment_id = self._experiment_id()
        if not self.leader:
            self.run_id = os.environ.get(RUN_ENV, "")
            return self
        reap_dead_runs(self.client, self.experiment_id)
        tags = {**self.tags, **process_tags()}
        if self.cfg.parent_run_id:
            tags[MLFLOW_PARENT_RUN_ID] = self.cfg.parent_run_id
        if self.run_id:
            self.client.update_run(self.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            self.set_tags({**tags, "resumed": "true"})
        else:
            self.run_id = self.client.create_run(self.experiment_id, run_name=self.run_name, tags=tags).info.run_id
        os.environ[RUN_ENV] = self.run_id
        self.heartbeat = Heartbeat(self.client, self.run_id).start()
        return self

    @leader_only
    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if exc is None:
            self.client.set_terminated(self.run_id, RunStatus.to_string(RunStatus.FINISHED))
            return
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        stopped = STOP.signum is not None or isinstance(exc, KeyboardInterrupt | Stopped)
        message = STOP.describe() if STOP.signum is not None else f"{exc_type.__name__}: {exc}"
        self.client.set_tag(self.run_id, "error", message[:5000])
        self.client.set_tag(self.run_id, MLFLOW_RUN_NOTE, f"{'Stopped' if stopped else 'Failed'}: {message[:4000]}")
        self.log_text(text, "error.txt")
        status = RunStatus.KILLED if stopped else RunStatus.FAILED
        self.client.set_terminated(self.run_id, RunStatus.to_string(status))

    @leader_only
    def log_params(self, params: dict[str, str]) -> None:
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    @leader_only
    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    @leader_only
    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    @leader_only
    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        self.log_text(json.dumps(data, indent=2, default=str), name)

    @leader_only
    def log_figure(self, figure: Any, name: str) -> None:
        """Logs, then closes the figure: pyplot keeps every figure alive, so runs in one process would pile them up."""
        self.client.log_figure(self.run_id, figure, name)
        plt.close(figure)

    @leader_only
    def log_inputs(self, inputs: list[Any]) -> None:
        """Two workers logging the same data set at once race in MLflow's store (it looks the data set up, then
        inserts it: the second insert breaks the unique key); once the first has inserted it, a retry links it."""
        try:
            self.client.log_inputs(self.run_id, inputs)
        except mlflow.exceptions.MlflowException as e:
            if "unique" not in str(e).lower():
                raise
            time.sleep(0.5)
            self.client.log_inputs(self.run_id, inputs)

    @leader_only
    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    @leader_only
    def log_file(self, write: Callable[[Path], None], artifact_file: str) -> None:
        """The artifact `write(path)` makes: straight into the run's artifact folder when it is on this machine (a
        90 MB checkpoint is then written once, not written and copied), else through a temporary file."""
        uri = urllib.parse.urlparse(self.client.get_run(self.run_id).info.artifact_uri)
        if uri.scheme in ("", "file"):
            target = Path(urllib.request.url2pathname(uri.path), artifact_file)
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".partial")
            write(partial)
            partial.replace(target)  # a reader never sees half a file
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, Path(artifact_file).name)
            write(path)
            self.log_artifact(path, str(Path(artifact_file).parent))

    def logger(self) -> EpochMLFlowLogger:
        return EpochMLFlowLogger(
            experiment_name=self.cfg.experiment, tracking_uri=self.uri, run_id=self.run_id, log_model=False
        )


class EpochMLFlowLogger(MLFlowLogger):
    """Logs Lightning's epoch-level metrics with step = epoch, so curves line up across runs and batch sizes.

    An epoch's metrics arrive in several calls (training means, validation, LRs, the training state); each would
    be one write to the store (on SQLite ~10 ms: a cached trial's epochs cost more in commits than in math), so
    they are held until the step moves on, the fit or test ends, or the run stops, and written as one batch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending: dict[str, float] = {}
        self._pending_step: int | None = None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        metrics = dict(metrics)
        epoch = metrics.pop("epoch", None)
        step = int(epoch) if epoch is not None else step
        if self._pending and step != self._pending_step:
            self.flush()
        self._pending_step = step
        self._pending.update(metrics)

    def flush(self) -> None:
        if self._pending:
            super().log_metrics(self._pending, step=self._pending_step)
        self._pending = {}

    def finalize(self, status: str = "success") -> None:
        """Status is owned by `MLflowRun`; only flush here."""
        self.flush()
