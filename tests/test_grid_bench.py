"""Benchmark: the jobs of one grid share their set-up (issue 24). A grid of linear probes of MiniLM on the same
SST-2 sentences (`optim.lr` varied), one process (Hydra's basic launcher), on an empty cache: job 1 pays the
imports, the backbone and the encoding pass; jobs 2.. should cost what their head costs.

    python -m tests.test_grid_bench                       # 4 jobs on 1,000 sentences: the issue's acceptance
    python -m tests.test_grid_bench --jobs 3 --samples 200
    python -m pytest -m bench tests/test_grid_bench.py -s  # the quick version as a test

Prints ONE JSON line. A job's wall time runs from Hydra's launch line of that job to the next one's (the last: to
its MLflow run's end), so it includes everything the job does; `phases_s` splits jobs 2.. by their log lines.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import run_cli, shared
from tests.test_cache_bench import sst2_paths, store

STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[([^\]]+)\]")
# What a job's log says as it goes, in order: the phase that ends with each line.
PHASES = [
    ("mlflow run + config", "Seed set to"),
    ("backbone", "src.backbones"),
    ("data", "src.data"),
    ("feature cache", "src.features"),
    ("fit", "`Trainer.fit` stopped"),
    ("test", "Loaded model weights"),
]


def _time(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def job_logs(log: str) -> list[list[tuple[float, str]]]:
    """The log lines of each job, with their time stamps: a job starts at Hydra's `#<n> :` launch line."""
    stamped = sorted((_time(m.group(1)), line) for line in log.splitlines() if (m := STAMP.match(line)))
    jobs: list[list[tuple[float, str]]] = []
    for t, line in stamped:  # stdout and stderr, merged in time order
        if "[HYDRA]" in line and re.search(r"\t#\d+ : ", line):
            jobs.append([])
        if jobs:
            jobs[-1].append((t, line))
    return jobs


def phases(lines: list[tuple[float, str]], end: float) -> dict[str, float]:
    """Seconds from one phase's last line to the next's; `results` is the rest (report, weights, summary)."""
    out, start = {}, lines[0][0]
    for name, marker in PHASES:
        stamps = [t for t, line in lines if marker in line]
        if stamps:
            out[name] = round(stamps[-1] - start, 2)
            start = stamps[-1]
    out["results"] = round(end - start, 2)
    return out


def measure(jobs: int = 4, samples: int = 1000) -> dict[str, Any]:
    lrs = [round(0.01 * (i + 1), 3) for i in range(jobs)]
    with tempfile.TemporaryDirectory(prefix="grid-bench-") as root:
        tmp = Path(root)
        args = [
            "-m",
            "experiment=sst2_minilm",
            "finetune=linear_probe",
            f"data.max_train_samples={samples}",
            f"optim.lr={','.join(map(str, lrs))}",
            *sst2_paths(),
            f"data.test_path={shared('sst2') / 'test.tsv'}",
            *store(tmp),
            f"cache.dir={tmp / 'cache'}",
            f"hydra.sweep.dir={tmp / 'multirun'}",
        ]
        proc = run_cli(args, tmp, timeout=3600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name("transfer-lab").experiment_id])
        children = sorted((r for r in runs if "job_num" in r.data.tags), key=lambda r: int(r.data.tags["job_num"]))
        logs = job_logs(proc.stdout + proc.stderr)
        kept = {m.source_run_id for m in client.search_logged_models([children[0].info.experiment_id])}
    assert len(children) == len(logs) == jobs
    ends = [log[0][0] for log in logs[1:]] + [children[-1].info.end_time / 1000]
    wall = [round(end - log[0][0], 2) for log, end in zip(logs, ends, strict=True)]
    out: dict[str, Any] = {"bench": "grid", "jobs": jobs, "samples": samples, "job_s": wall}
    out["later_over_first"] = [round(w / wall[0], 3) for w in wall[1:]]
    out["kept_model"] = [r.info.run_id in kept for r in children]  # tracking.keep_models=best
    out["phases_s"] = {
        name: round(statistics.mean(phases(log, end)[name] for log, end in zip(logs[1:], ends[1:], strict=True)), 2)
        for name in [p for p, _ in PHASES] + ["results"]
    }
    out["val_acc"] = [round(r.data.metrics["best/val/acc"], 4) for r in children]
    out["load_avg"] = [round(x, 1) for x in os.getloadavg()]
    return out


@pytest.mark.bench
def test_later_jobs_of_a_grid_cost_their_head() -> None:
    figures = measure(jobs=3, samples=200)
    print(json.dumps(figures))
    assert max(figures["later_over_first"]) < 0.5


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.test_grid_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--samples", type=int, default=1000)
    args = parser.parse_args()
    print(json.dumps(measure(args.jobs, args.samples)))


if __name__ == "__main__":
    main()
