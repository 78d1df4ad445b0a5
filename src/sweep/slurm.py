"""SLURM jobs that cannot hang a sweep silently: the request is checked against what the cluster offers before
anything is submitted, and submitted jobs are watched, so one that can never start, or whose state cannot be read,
ends with a message instead of a wait forever (`hydra_plugins/checked_slurm_launcher` uses both).

A job stopped by a signal (preemption, `scontrol requeue`, submitit's requeue at the time limit) is requeued by
SLURM under the same job id and resumes its run from `last.ckpt` (`src.tracking.resume`); its trial stays RUNNING
meanwhile (`src.sweep.trial`), so the watch below simply keeps waiting for that job.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from src.schema import ConfigError

log = logging.getLogger(__name__)

SETUP_HINT = "tests/cluster/setup_slurm.sh sets up a single-node cluster with accounting"
# squeue reasons for which a pending job will never start without a change to the request or the cluster
UNSATISFIABLE = {
    "BadConstraints": "its constraints cannot be satisfied",
    "PartitionConfig": "no node of its partition is configured with what it asks for",
    "PartitionNodeLimit": "it asks for more nodes than its partition allows",
    "PartitionTimeLimit": "its time limit (hydra.launcher.timeout_min) exceeds the partition's",
    "InvalidAccount": "its account (hydra.launcher.account) is invalid",
    "InvalidQOS": "its QOS (hydra.launcher.qos) is invalid",
    "QOSMaxWallDurationPerJobLimit": "its time limit (hydra.launcher.timeout_min) exceeds the QOS's",
    "AssocMaxWallDurationPerJobLimit": "its time limit (hydra.launcher.timeout_min) exceeds the account's",
    "DependencyNeverSatisfied": "its dependency can never be satisfied",
}
RESOURCE_KEYS = "hydra.launcher.gpus_per_node, cpus_per_task, mem_gb, partition"
UNREADABLE_AFTER_S = 60.0  # a job gone from the queue, with no result and no accounting record for this long


class ClusterError(ConfigError):
    """The SLURM request cannot run on this cluster: the message names the launcher keys to change."""


@dataclass(frozen=True)
class Node:
    name: str
    cpus: int
    mem_mb: int
    gpus: int
    partitions: tuple[str, ...]
    state: str


def slurm(*args: str, timeout: float = 30) -> str:
    """A SLURM command's output; a missing or failing command is the user's environment, said in one line."""
    if shutil.which(args[0]) is None:
        raise ClusterError(
            f"hydra/launcher: `{args[0]}` not found: the SLURM launchers need the SLURM client commands on this "
            f"machine (run the sweep from a login node; {SETUP_HINT})"
        )
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise ClusterError(f"`{' '.join(args)}` failed: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


def gpu_count(gres: str) -> int:
    """GPUs in a SLURM gres string: `gpu:4`, `gpu:a100:2(S:0-1),gpu:v100:1`, `(null)` -> 4, 3, 0."""
    total = 0
    for item in gres.split(","):
        parts = re.sub(r"\(.*?\)", "", item).split(":")
        if parts[0] == "gpu" and len(parts) > 1 and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def parse_nodes(text: str) -> list[Node]:
    """`scontrol show node --oneliner` (values such as OS= hold spaces, so each key is matched on its own)."""

    def field(line: str, key: str, default: str = "") -> str:
        found = re.search(rf"(?:^| ){key}=(\S*)", line)
        return found.group(1) if found else default

    return [
        Node(
            name=field(line, "NodeName"),
            cpus=int(field(line, "CPUTot", "0")),
            mem_mb=int(field(line, "RealMemory", "0")),
            gpus=gpu_count(field(line, "Gres", "(null)")),
            partitions=tuple(p for p in field(line, "Partitions").split(",") if p),
            state=field(line, "State"),
        )
        for line in text.splitlines()
        if line.startswith("NodeName=")
    ]


@dataclass(frozen=True)
class Request:
    """What one trial's job asks for, per node, from the launcher's parameters (submitit's names)."""

    partition: str | None
    nodes: int
    gpus: int
    cpus: int
    mem_mb: int

    @classmethod
    def of(cls, params: Mapping[str, Any]) -> Request:
        tasks = params.get("tasks_per_node") or 1
        gpus = params.get("gpus_per_node") or (params.get("gpus_per_task") or 0) * tasks
        if not gpus and params.get("gres"):
            gpus = gpu_count(str(params["gres"]))
        return cls(
            partition=params.get("partition"),
            nodes=params.get("nodes") or 1,
            gpus=int(gpus),
            cpus=int((params.get("cpus_per_task") or 1) * tasks),
            mem_mb=int(float(params.get("mem_gb") or 0) * 1024),
        )

    def fits(self, node: Node) -> bool:
        return node.gpus >= self.gpus and node.cpus >= self.cpus and node.mem_mb >= self.mem_mb


def check_request(request: Request, nodes: list[Node], partitions: list[str], default: str | None) -> None:
    """Fail before submitting when no node of the partition can ever run one trial's job."""
    if request.partition is not None and request.partition not in partitions:
        raise ClusterError(
            f"hydra.launcher.partition={request.partition}: no such partition; this cluster has {partitions}"
        )
    partition = request.partition or default
    if partition is None:
        raise ClusterError(f"hydra.launcher.partition: required, this cluster has no default; one of {partitions}")
    members = [n for n in nodes if partition in n.partitions]
    fitting = [n for n in members if request.fits(n)]
    if len(fitting) >= request.nodes:
        return
    most = {  # key: (asked, the most any node of the partition has, as the value to set)
        "gpus_per_node": (request.gpus, max((n.gpus for n in members), default=0)),
        "cpus_per_task": (request.cpus, max((n.cpus for n in members), default=0)),
        "mem_gb": (request.mem_mb // 1024, max((n.mem_mb for n in members), default=0) // 1024),
    }
    too_big = [f"hydra.launcher.{key}<={has}" for key, (want, has) in most.items() if want > has]
    what = "{} GPU(s), {} CPU(s), {} GB".format(*(want for want, _ in most.values()))
    offer = "{} GPU(s), {} CPU(s), {} GB".format(*(has for _, has in most.values()))
    if not too_big:  # each fits some node, but not all on one node, or not on enough nodes
        too_big = [f"hydra.launcher.nodes<={len(fitting)}"] if fitting else [RESOURCE_KEYS]
    raise ClusterError(
        f"hydra/launcher: a trial asks for {what} per node, and no{'t enough' if fitting else ''} node of "
        f"partition {partition!r} has that (at most {offer}): set {' '.join(too_big)}, or another "
        f"hydra.launcher.partition (one of {partitions}); on CPU-only nodes use hydra/launcher=slurm_cpu"
    )


def preflight(params: Mapping[str, Any]) -> None:
    """The launcher's request against `scontrol`/`sinfo`, and accounting (`sacct`), which the job watch needs."""
    nodes = parse_nodes(slurm("scontrol", "show", "node", "--oneliner"))
    listed = slurm("sinfo", "--noheader", "--format=%P").split()
    partitions = [p.rstrip("*") for p in listed]
    default = next((p.rstrip("*") for p in listed if p.endswith("*")), None)
    check_request(Request.of(params), nodes, partitions, default)
    try:
        slurm("sacct", "--noheader", "--allocations", "--starttime=now", "--format=JobID")
    except ClusterError as e:
        raise ClusterError(
            f"SLURM accounting does not answer ({e}): without `sacct` the launcher cannot tell that a trial's job "
            f"died, so the sweep would wait for it forever; configure slurmdbd ({SETUP_HINT})"
        ) from None


def queue_states() -> dict[str, tuple[str, str]]:
    """{job id: (state, reason)} for this user's jobs SLURM's queue still holds, one line per array task."""
    out = slurm("squeue", "--noheader", "--array", "--me", "--format=%i|%T|%r")
    return {i: (s, r) for i, s, r in (line.split("|", 2) for line in out.splitlines() if line.count("|") == 2)}


class JobLost(RuntimeError):
    """A job left SLURM's queue without a result, and accounting cannot say how it ended."""


def watch(jobs: Sequence[Any], poll_s: float = 5.0) -> list[JobLost | None]:
    """Wait until every submitit job has ended: None for a job whose result (or error) can be read, a `JobLost`
    for one gone from the queue whose state nobody can read. A job PENDING for a reason that cannot change
    cancels the batch and raises a `ClusterError`, instead of a wait forever."""
    ended: dict[int, JobLost | None] = {}
    gone_since: dict[int, float] = {}

    def gone_for(i: int) -> float:
        return time.time() - gone_since.setdefault(i, time.time())

    while True:
        queue = queue_states()
        for i, job in enumerate(jobs):
            if i in ended:
                continue
            state, reason = queue.get(job.job_id, ("", ""))
            if state == "PENDING" and reason in UNSATISFIABLE:
                for other in jobs:
                    other.cancel(check=False)
                raise ClusterError(
                    f"trial job {job.job_id} stays PENDING ({reason}: {UNSATISFIABLE[reason]}); check "
                    f"{RESOURCE_KEYS} against `sinfo -o '%P %c %m %G'`; the batch was cancelled"
                )
            if job.done(force_check=not state):  # not in the queue: ask accounting now
                ended[i] = None
            elif not state and job.state == "UNKNOWN" and gone_for(i) > UNREADABLE_AFTER_S:
                ended[i] = JobLost(
                    f"job {job.job_id} left the queue without a result and `sacct -j {job.job_id}` cannot say "
                    f"how it ended (is accounting, slurmdbd, running?); see {job.paths.stderr}"
                )
        if len(ended) == len(jobs):
            return [ended[i] for i in range(len(jobs))]
        time.sleep(poll_s)
