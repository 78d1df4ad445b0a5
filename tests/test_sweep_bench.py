"""Acceptance figures of the Optuna sweeps (reported in sweeps/README.md), measured on this machine:

1. the 20-trial `digits_lr` sweep with its pruner vs the same sweep with `sweep.pruner=none`: training epochs
   used (validations reported = epochs run) and best objective;
2. kill a sweep (SIGKILL) after some finished trials, relaunch it: finished trials lost.

    python -m tests.test_sweep_bench          # prints ONE JSON line at the end
    python -m pytest -m bench tests/test_sweep_bench.py -s
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from src.sweep.study import counted_trials
from tests.test_sweep import kill_after, study, sweep

TRIALS = 20  # digits_lr as shipped: 20 trials of up to 6 epochs


def measure_pruning(root: Path, trials: int = TRIALS) -> dict[str, Any]:
    out: dict[str, Any] = {"trials": trials}
    for label, args in (("pruned", []), ("unpruned", ["sweep.pruner=none"])):
        tmp = root / label
        tmp.mkdir()
        start = time.perf_counter()
        sweep(tmp, f"sweep.n_trials={trials}", *args)
        s = study(tmp)
        out[f"wall_s_{label}"] = round(time.perf_counter() - start, 1)
        out[f"epochs_{label}"] = sum(len(t.intermediate_values) for t in s.trials)
        out[f"best_{label}"] = s.best_value
        out[f"n_pruned_{label}"] = sum(t.state.name == "PRUNED" for t in s.trials)
    out["epoch_ratio"] = round(out["epochs_pruned"] / out["epochs_unpruned"], 3)
    out["best_gap_points"] = round(100 * (out["best_unpruned"] - out["best_pruned"]), 2)
    return out


def measure_resume(root: Path, trials: int = 6, kill_at: int = 3) -> dict[str, Any]:
    tmp = root / "resume"
    tmp.mkdir()
    before = kill_after(tmp, kill_at, f"sweep.n_trials={trials}")
    sweep(tmp, f"sweep.n_trials={trials}")
    after = {t.number: t for t in study(tmp).trials}
    kept = [n for n, t in before.items() if (after[n].state, after[n].values) == (t.state, t.values)]
    return {
        "finished_before_kill": len(before),
        "finished_lost": len(before) - len(kept),
        "counted_after_relaunch": len(counted_trials(list(after.values()))),
        "trials_after_relaunch": len(after),
        "still_running": sum(t.state.name in ("RUNNING", "WAITING") for t in after.values()),
    }


def measure() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sweep-bench-") as root:
        return {**measure_pruning(Path(root)), "resume": measure_resume(Path(root))}


@pytest.mark.bench
def test_acceptance_figures() -> None:
    figures = measure()
    print(json.dumps(figures))
    assert figures["epoch_ratio"] <= 0.6
    assert figures["best_gap_points"] <= 1.0
    assert figures["resume"]["finished_lost"] == 0 and figures["resume"]["still_running"] == 0


if __name__ == "__main__":
    print(json.dumps(measure()))
