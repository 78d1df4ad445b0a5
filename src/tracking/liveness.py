"""A run killed with -9 (or whose machine died) cannot end its own MLflow run. Every run records which process
runs it and beats a heartbeat tag; the next run started against the same store ends such orphans FAILED, so no
run stays RUNNING forever.

Same host: the recorded process (pid + start time, so a reused pid does not count) is checked directly. Another
host: the heartbeat must be younger than `STALE_AFTER_S`.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import psutil
from mlflow.entities import RunStatus, ViewType
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

log = logging.getLogger(__name__)

HOST_TAG = "process.host"
PID_TAG = "process.pid"
STARTED_TAG = "process.started"  # the process's start time (s since epoch): a pid reused later does not match
HEARTBEAT_TAG = "process.heartbeat"  # s since epoch, refreshed every HEARTBEAT_S
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0


def process_tags() -> dict[str, str]:
    me = psutil.Process()
    return {
        HOST_TAG: socket.gethostname(),
        PID_TAG: str(me.pid),
        STARTED_TAG: f"{me.create_time():.2f}",
        HEARTBEAT_TAG: f"{time.time():.0f}",
    }


def is_alive(tags: dict[str, str], now: float | None = None) -> bool:
    """Whether the process recorded in a run's tags still runs it (runs without the tags count as alive)."""
    if HOST_TAG not in tags:
        return True
    if tags[HOST_TAG] == socket.gethostname():
        try:
            process = psutil.Process(int(tags[PID_TAG]))
            return abs(process.create_time() - float(tags[STARTED_TAG])) < 1.0
        except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError, KeyError):
            return False
    beat = float(tags.get(HEARTBEAT_TAG, 0))
    return (now or time.time()) - beat < STALE_AFTER_S


def reap_dead_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """End every RUNNING run of the experiment whose process is gone FAILED, with the reason; returns their ids."""
    dead = []
    runs = client.search_runs([experiment_id], "attributes.status = 'RUNNING'", ViewType.ACTIVE_ONLY, 1000)
    for run in runs:
        if is_alive(run.data.tags):
            continue
        reason = (
            f"process {run.data.tags.get(PID_TAG)} on {run.data.tags.get(HOST_TAG)} died without ending the run "
            "(killed with -9, out of memory, or the machine went down); found by a later run"
        )
        client.set_tag(run.info.run_id, "error", reason)
        client.set_tag(run.info.run_id, MLFLOW_RUN_NOTE, f"Failed: {reason}")
        client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
        dead.append(run.info.run_id)
    if dead:
        log.warning("marked %d dead run(s) FAILED (their process is gone): %s", len(dead), ", ".join(dead))
    return dead


class Heartbeat:
    """Refreshes the run's heartbeat tag from a daemon thread while the run lives."""

    def __init__(self, client: MlflowClient, run_id: str, interval: float = HEARTBEAT_S) -> None:
        self.client, self.run_id, self.interval = client, run_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="mlflow-heartbeat", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.client.set_tag(self.run_id, HEARTBEAT_TAG, f"{time.time():.0f}")
            except Exception as e:  # noqa: BLE001 - a missed beat must not kill the run
                log.debug("heartbeat of run %s failed: %s", self.run_id, e)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
