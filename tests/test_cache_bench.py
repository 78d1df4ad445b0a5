"""Benchmark P2, the frozen-feature cache: the `sst2_probe` Optuna sweep (MiniLM linear probe, 10 trials x 10
epochs on 2,000 SST-2 sentences, dev as validation) with the cache off and on, both measured in this run; and the
issue's acceptance run (one 10-epoch linear probe on 4,000 sentences, then the same command again).

    python -m tests.test_cache_bench                                   # the full P2 (hours with the cache off on a CPU)
    python -m tests.test_cache_bench --trials 3 --epochs 3 --samples 300 --val-batches 5   # a quick check
    python -m tests.test_cache_bench --off-trials 2                    # 10 cached trials, 2 uncached (extrapolated)
    python -m tests.test_cache_bench --acceptance                      # the single-run acceptance instead
    python -m pytest -m bench tests/test_cache_bench.py -s              # the quick check as a test

Each prints ONE JSON line. Per trial: its MLflow run's wall time; epochs: the time between consecutive validation
results (so epoch 1's includes nothing before training: the encoding pass is `encode_s`, the cache's own timer).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from tests.conftest import run_cli, shared

SPLITS = {"train": "train.tsv", "val": "dev.tsv"}  # the sweep validates (and tests) on dev


def sst2_paths() -> list[str]:
    sst2 = shared("sst2")
    return [f"data.{split}_path={sst2 / file}" for split, file in SPLITS.items()]


def store(tmp: Path) -> list[str]:
    return [f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", f"tracking.artifact_location={tmp / 'mlruns'}"]


def finished_runs(tmp: Path) -> list[Run]:
    """The runs that trained (a sweep's trials; not its parent), oldest first."""
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("transfer-lab").experiment_id])
    return sorted((r for r in runs if "test/acc" in r.data.metrics), key=lambda r: r.info.start_time)


def epoch_seconds(tmp: Path, run: Run) -> list[float]:
    """Seconds between consecutive validation results: the time of epochs 2..N (training + validation)."""
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    stamps = sorted(m.timestamp for m in client.get_metric_history(run.info.run_id, "val/acc"))
    return [round((b - a) / 1000, 2) for a, b in zip(stamps, stamps[1:], strict=False)]


def run_seconds(run: Run) -> float:
    return (run.info.end_time - run.info.start_time) / 1000


def sweep(tmp: Path, trials: int, epochs: int, samples: int, val_batches: int | None, cache: list[str]) -> float:
    tmp.mkdir(parents=True)
    args = [
        "-m",
        "sweep=sst2_probe",
        f"sweep.n_trials={trials}",
        f"sweep.storage={tmp / 'optuna.journal'}",
        f"hydra.sweep.dir={tmp / 'multirun'}",
        f"trainer.max_epochs={epochs}",
        f"data.max_train_samples={samples}",
        *([f"+trainer.limit_val_batches={val_batches}"] if val_batches else []),
        *sst2_paths(),
        *store(tmp),
        *cache,
    ]
    start = time.perf_counter()
    proc = run_cli(args, tmp, timeout=6 * 3600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return time.perf_counter() - start


def measure_sweep(
    trials: int = 10,
    epochs: int = 10,
    samples: int = 2000,
    val_batches: int | None = None,
    off_trials: int | None = None,
) -> dict:
    """Both sweeps; with `off_trials` < `trials` the cache-off sweep runs that many trials only, and its wall time
    for `trials` is extrapolated (`wall_s_off`: measured wall + the mean off trial x the trials not run)."""
    out: dict[str, Any] = {"bench": "P2", "trials": trials, "epochs": epochs, "samples": samples}
    out["val_batches"] = val_batches or "all"
    off_trials = off_trials or trials
    with tempfile.TemporaryDirectory(prefix="cache-bench-") as root:
        for label, cache in (("off", ["cache.enabled=false"]), ("on", [f"cache.dir={Path(root) / 'cache'}"])):
            tmp = Path(root, label)
            n = off_trials if label == "off" else trials
            out[f"wall_s_{label}"] = round(sweep(tmp, n, epochs, samples, val_batches, cache), 1)
            runs = finished_runs(tmp)
            assert len(runs) == n
            if n < trials:
                out["off_trials_run"] = n
                out["wall_s_off"] += round(statistics.mean(map(run_seconds, runs)) * (trials - n), 1)
                out["wall_s_off_extrapolated"] = True
            out[f"trial_s_{label}"] = [round(run_seconds(r), 1) for r in runs]
            out[f"best_{label}"] = round(max(r.data.metrics["val/acc"] for r in runs), 4)
            if label == "on":
                metrics = runs[0].data.metrics
                out["encode_s"] = round(metrics["cache/features/seconds_computing"], 1)
                out["hits_after_first"] = sum(r.data.metrics["cache/features/hits"] for r in runs[1:])
                cached = runs[1:] or runs
                out["cached_trial_s_mean"] = round(statistics.mean(run_seconds(r) for r in cached), 1)
                out["cached_epoch_s_median"] = statistics.median(s for r in cached for s in epoch_seconds(tmp, r))
    out["speedup"] = round(out["wall_s_off"] / out["wall_s_on"], 1)
    out["load_avg"] = [round(x, 1) for x in os.getloadavg()]
    return out


def measure_acceptance(samples: int = 4000, epochs: int = 10) -> dict[str, Any]:
    """`python -m src.run experiment=sst2_minilm finetune=linear_probe data.max_train_samples=4000
    trainer.max_epochs=10`, twice, on an empty cache."""
    out: dict[str, Any] = {"bench": "acceptance", "samples": samples, "epochs": epochs}
    with tempfile.TemporaryDirectory(prefix="cache-accept-") as root:
        tmp = Path(root)
        sst2 = shared("sst2")
        args = [
            "experiment=sst2_minilm",
            "finetune=linear_probe",
            f"data.max_train_samples={samples}",
            f"trainer.max_epochs={epochs}",
            *(f"data.{split}_path={sst2 / f}" for split, f in {**SPLITS, "test": "test.tsv"}.items()),
            *store(tmp),
            f"cache.dir={tmp / 'cache'}",
        ]
        for label in ("first", "again"):
            start = time.perf_counter()
            proc = run_cli(args, tmp, timeout=6 * 3600)
            assert proc.returncode == 0, proc.stderr[-4000:]
            wall = time.perf_counter() - start
            run = finished_runs(tmp)[-1]
            m = run.data.metrics
            out[label] = {
                "wall_s": round(wall, 1),
                "encode_s": round(m["cache/features/seconds_computing"], 1),
                "hits": m["cache/features/hits"],
                "misses": m["cache/features/misses"],
                "epoch_s_2_to_n": epoch_seconds(tmp, run),
                "dev_acc": round(m["val/acc"], 4),
                "test_acc": round(m["test/acc"], 4),
            }
        first = out["first"]
        # Epoch 1 of an uncached probe = one encoding pass of train + dev; a cached epoch must cost < 5 % of it.
        out["max_epoch_over_encode"] = round(max(first["epoch_s_2_to_n"]) / first["encode_s"], 4)
    out["load_avg"] = [round(x, 1) for x in os.getloadavg()]
    return out


@pytest.mark.bench
def test_cache_speeds_up_a_probe_sweep() -> None:
    figures = measure_sweep(trials=3, epochs=3, samples=300, val_batches=5)
    print(json.dumps(figures))
    assert figures["hits_after_first"] == 2 * 2  # train + dev of trials 2 and 3
    assert figures["speedup"] > 1.5


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.test_cache_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--samples", type=int, default=2000, help="SST-2 training sentences")
    parser.add_argument("--val-batches", type=int, default=None, help="limit dev batches per validation")
    parser.add_argument("--off-trials", type=int, default=None, help="run fewer cache-off trials, extrapolate")
    parser.add_argument("--acceptance", action="store_true", help="the single-run acceptance instead of P2")
    args = parser.parse_args()
    if args.acceptance:
        print(json.dumps(measure_acceptance()))
    else:
        print(json.dumps(measure_sweep(args.trials, args.epochs, args.samples, args.val_batches, args.off_trials)))


if __name__ == "__main__":
    main()
