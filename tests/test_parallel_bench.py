"""Benchmark P6, parallel workers: the `digits_lr` sweep (pruning off, so both sides do the same work) on the
joblib launcher with 2 workers vs 1: trials per hour and trials lost.

    python -m tests.test_parallel_bench                 # 20 trials of 6 epochs per side
    python -m tests.test_parallel_bench --trials 6 --epochs 3   # a quick check
    python -m pytest -m bench tests/test_parallel_bench.py -s

Prints ONE JSON line. Each worker gets cores / workers torch threads (OMP_NUM_THREADS), so 2 workers do not fight
over the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from optuna.trial import TrialState

from tests.test_sweep import study, sweep


def run_sweep(tmp: Path, workers: int, trials: int, epochs: int) -> dict[str, Any]:
    tmp.mkdir()
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = threads
    try:
        start = time.perf_counter()
        sweep(
            tmp,
            f"sweep.n_trials={trials}",
            "sweep.pruner=none",
            f"trainer.max_epochs={epochs}",
            "hydra/launcher=joblib",
            f"hydra.launcher.n_jobs={workers}",
        )
        wall = time.perf_counter() - start
    finally:
        os.environ.pop("OMP_NUM_THREADS") if saved is None else os.environ.__setitem__("OMP_NUM_THREADS", saved)
    done = [t for t in study(tmp).trials if t.state == TrialState.COMPLETE]
    return {"wall_s": round(wall, 1), "trials_per_hour": round(3600 * len(done) / wall, 1), "lost": trials - len(done)}


def measure(trials: int = 20, epochs: int = 6) -> dict[str, Any]:
    out: dict[str, Any] = {"bench": "P6", "sweep": "digits_lr", "trials": trials, "epochs": epochs}
    with tempfile.TemporaryDirectory(prefix="parallel-bench-") as root:
        for workers in (1, 2):
            out[f"workers_{workers}"] = run_sweep(Path(root, str(workers)), workers, trials, epochs)
    out["speedup"] = round(out["workers_2"]["trials_per_hour"] / out["workers_1"]["trials_per_hour"], 2)
    out["lost"] = out["workers_1"]["lost"] + out["workers_2"]["lost"]
    out["load_avg"] = [round(x, 1) for x in os.getloadavg()]
    return out


@pytest.mark.bench
def test_two_workers_finish_more_trials_per_hour() -> None:
    figures = measure(trials=6, epochs=3)
    print(json.dumps(figures))
    # The speed-up is a figure, not a check: its goal (1.7x) needs more cores than one trial uses (README, P6).
    assert figures["lost"] == 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tests.test_parallel_bench")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    print(json.dumps(measure(args.trials, args.epochs)))
