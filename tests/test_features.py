"""The frozen-feature cache on real runs: same results cached or not, hits on repeat, misses on any key change,
racing workers, corrupt entries, augmentation bypass."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from src.config import validate
from src.run import run
from tests.conftest import REPO

DIGITS = ["trainer.max_epochs=3", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def run_in_process(tmp: Path, *overrides: str) -> dict[str, float]:
    """`python -m src.run OVERRIDES` in this process, stores under tmp; returns the run's MLflow metrics."""
    store = [f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", f"tracking.artifact_location={tmp / 'mlruns'}"]
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        raw = compose("config", overrides=[*store, "cache.dir=" + str(tmp / "cache"), *overrides])
    run(validate(raw), raw)
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    latest = max(client.search_runs([client.get_experiment_by_name("transfer-lab").experiment_id]), key=_start)
    return latest.data.metrics


def _start(r: Any) -> int:
    return r.info.start_time


@pytest.mark.parametrize(
    "strategy",
    [
        ["finetune=linear_probe"],
        ["finetune=partial", "finetune.k=2"],
        pytest.param(["finetune=lp_ft", "finetune.probe_epochs=2"], marks=pytest.mark.slow),
        pytest.param(["finetune=lp_ft", "finetune.probe_fit=true", "finetune.probe_epochs=0"], marks=pytest.mark.slow),
    ],
    ids=["linear_probe", "partial", "lp_ft", "lp_ft_probe_fit"],
)
def test_cached_run_matches_uncached_and_hits_on_repeat(tmp_path: Path, strategy: list[str]) -> None:
    off = run_in_process(tmp_path, *DIGITS, *strategy, "cache.enabled=false")
    first = run_in_process(tmp_path, *DIGITS, *strategy)
    again = run_in_process(tmp_path, *DIGITS, *strategy)
    assert first["cache/features/misses"] == 3 and first["cache/features/hits"] == 0  # train, val, test
    assert again["cache/features/hits"] == 3 and again["cache/features/misses"] == 0
    assert again["cache/features/seconds_computing"] == 0 and again["cache/features/bytes"] > 0
    # small_cnn has no dropout and frozen BN runs on its running statistics: the same function cached or not.
    for key in ("val/acc", "test/acc", "test/loss"):
        assert first[key] == pytest.approx(off[key], abs=2e-3), key
        assert again[key] == first[key], key  # a hit and a miss leave the same random stream
