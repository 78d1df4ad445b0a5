"""Where a study lives, opened the same way by the sweeper and by every job (any launcher, any machine).

Both kinds of storage get heartbeats, so a trial whose worker died is failed (and retried) instead of
staying RUNNING forever: Optuna's RDBStorage has them built in; its journal file storage does not, so
`HeartbeatJournalStorage` adds them (the journal is the default because its file lock is safe for many
processes and on NFS, where SQLite's locking is not).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from contextlib import suppress
from pathlib import Path
from threading import Event, Thread
from types import TracebackType

import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from src.sweep.schema import SweepConfig
from src.tracking import resolve_uri

log = logging.getLogger(__name__)

DEFAULT_FILE = "optuna.journal"
# The storage password travels to jobs in this variable, never as an override: Hydra writes a job's overrides and
# config to disk and the launchers print them. Users may also set it themselves (or use PGPASSWORD / ~/.pgpass).
PASSWORD_ENV = "TRANSFER_LAB_STORAGE_PASSWORD"
HEARTBEAT_ATTR = "heartbeat"
SQLITE_BUSY_TIMEOUT_S = 120

# Heartbeats, stale-trial failing and retries are experimental in Optuna, and it expects heartbeats with
# Study.optimize only; we use them on purpose with ask/tell across processes.
warnings.filterwarnings("ignore", category=ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


def default_storage(tracking_uri: str, launch_dir: Path) -> str:
    """The journal file next to the MLflow SQLite database (or in the launch directory for other stores)."""
    uri = resolve_uri(tracking_uri, launch_dir)
    base = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else launch_dir
    return str(base / DEFAULT_FILE)


def resolve(storage: str | None, tracking_uri: str, launch_dir: Path) -> str:
    """Absolute form of `sweep.storage` (relative paths are against the launch directory, as for MLflow)."""
    if storage is None:
        return default_storage(tracking_uri, launch_dir)
    return resolve_uri(storage, launch_dir)


def is_journal(url: str) -> bool:
    return "://" not in url


def display_url(url: str) -> str:
    """The storage without its password, for logs and MLflow (`postgresql://user:***@host/db`)."""
    if is_journal(url):
        return url
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def hand_over_password(url: str) -> str:
    """`url` without its password, which moves to `PASSWORD_ENV` for this process and every job it launches
    (launchers pass the environment on: joblib, submitit, sbatch's default `--export=ALL`)."""
    if is_journal(url):
        return url
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.password is None:
        return url
    os.environ[PASSWORD_ENV] = str(parsed.password)
    log.warning(
        "sweep.storage carries a password: it was taken out of every job's config and log, but your shell history "
        "may keep it; next time set %s (or PGPASSWORD, ~/.pgpass) and leave it out of the URL",
        PASSWORD_ENV,
    )
    return parsed._replace(password=None).render_as_string(hide_password=False)  # set() ignores None


def url_password(url: str) -> str | None:
    """The password as written in the URL (percent-encoded), to find it in other strings."""
    if is_journal(url) or "@" not in url.split("://", 1)[1]:
        return None
    userinfo = url.split("://", 1)[1].rsplit("@", 1)[0]
    return userinfo.split(":", 1)[1] if ":" in userinfo else None


def with_password(url: str) -> str:
    """The URL to connect with: the password from `PASSWORD_ENV` when the URL has none."""
    password = os.environ.get(PASSWORD_ENV)
    if is_journal(url) or not password:
        return url
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    return url if parsed.password is not None else parsed.set(password=password).render_as_string(hide_password=False)


def open_storage(url: str, settings: SweepConfig) -> BaseStorage:
    """A journal file (`*.journal` path) or an RDB URL, with heartbeats and retry of dead workers' trials."""
    retry = RetryHeartbeatStaleTrialCallback(max_retry=settings.max_retry)
    if is_journal(url):
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return HeartbeatJournalStorage(
            JournalFileBackend(url), settings.heartbeat_interval, settings.grace_period, retry
        )
    engine_kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}} if url.startswith("sqlite") else None
    return RDBStorage(
        with_password(url),
        engine_kwargs=engine_kwargs,
        heartbeat_interval=settings.heartbeat_interval,
        grace_period=settings.grace_period,
        heartbeat_stale_trial_callback=retry,
    )


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Journal storage plus heartbeats kept as a trial system attribute (wall-clock seconds).

    A trial is stale when neither its last heartbeat nor its start is within the grace period, so a retried
    trial (which copies its original's attributes) is never judged by the original's old heartbeat.
    """

    def __init__(
        self,
        backend: JournalFileBackend,
        heartbeat_interval: int,
        grace_period: int,
        stale_trial_callback: RetryHeartbeatStaleTrialCallback,
    ) -> None:
        super().__init__(backend)
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.stale_trial_callback = stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        with suppress(UpdateFinishedTrialError):  # the trial ended between two beats
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        return [
            t._trial_id
            for t in running
            if now - max(t.system_attrs.get(HEARTBEAT_ATTR, 0.0), t.datetime_start.timestamp()) > self.grace_period
        ]

    def get_heartbeat_interval(self) -> int:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> RetryHeartbeatStaleTrialCallback:
        return self.stale_trial_callback


class Heartbeat:
    """Beats for some trials from a background thread while the caller blocks (a job training, or the sweeper
    waiting on a launcher: a queued SLURM job has not started beating yet)."""

    def __init__(self, storage: BaseStorage, trial_ids: list[int], interval: float) -> None:
        self.storage, self.trial_ids, self.interval = storage, trial_ids, interval
        self._stop = Event()
        self._thread = Thread(target=self._run, name="optuna-heartbeat", daemon=True)

    def _run(self) -> None:
        while True:
            for trial_id in self.trial_ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as e:  # a busy or briefly unreachable storage must not end the beating
                    log.warning("heartbeat of trial id %d failed: %s", trial_id, e)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()


def load_study(name: str, url: str) -> optuna.Study:
    """A study as it is in the storage (to inspect it: sampler and pruner are not the sweep's)."""
    return optuna.load_study(study_name=name, storage=open_storage(url, SweepConfig()))
