"""Acceptance figures of the transfer strategies on SST-2 with the packaged MiniLM (4,000 training sentences,
GLUE dev 872, labelled test 1,821), each recipe run through the real CLI on CPU and read back from MLflow:

    python -m tests.test_sst2_bench           # prints ONE JSON line at the end (about 15 min on 2 cores)
    python -m pytest -m bench tests/test_sst2_bench.py -s
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import run_cli, shared

SPLITS = {"train": "train.tsv", "val": "dev.tsv", "test": "test.tsv"}  # data.<split>_path -> file in shared/sst2
# recipe -> (overrides on top of experiment=sst2_minilm, dev-accuracy target of the issue)
RECIPES: dict[str, tuple[list[str], float]] = {
    "full_layer_decay": (["optim.lr=2e-4", "optim.layer_decay=0.9", "trainer.max_epochs=2"], 0.85),
    "lp_ft": (
        [
            "finetune=lp_ft",
            "finetune.probe_fit=true",
            "finetune.probe_epochs=0",
            "finetune.ft_lr_scale=1",
            "optim.lr=2e-4",
            "optim.layer_decay=0.9",
            "trainer.max_epochs=2",
        ],
        0.85,
    ),
    "lora": (["finetune=lora", "optim.lr=1e-3", "trainer.max_epochs=2"], 0.80),
}


def measure_recipe(overrides: list[str], root: Path) -> dict[str, Any]:
    sst2 = shared("sst2")
    data = [f"data.{split}_path={sst2 / file}" for split, file in SPLITS.items()]
    start = time.perf_counter()
    proc = run_cli(["experiment=sst2_minilm", *data, *overrides, "tracking.log_checkpoint=false"], root, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("transfer-lab").experiment_id])
    dev = sorted(client.get_metric_history(run.info.run_id, "val/acc"), key=lambda m: m.step)
    params = client.get_metric_history(run.info.run_id, "trainable_params")
    return {
        "dev_acc_by_epoch": [round(m.value, 4) for m in dev],
        "dev_acc_best": round(max(m.value for m in dev), 4),
        "test_acc": round(run.data.metrics["test/acc"], 4),
        "trainable_params_max": int(max(m.value for m in params)),
        "wall_s": round(time.perf_counter() - start, 1),
    }


def measure() -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="sst2-bench-") as root:
        for name, (overrides, _) in RECIPES.items():
            (Path(root) / name).mkdir()
            out[name] = measure_recipe(overrides, Path(root) / name)
    return out


@pytest.mark.bench
def test_acceptance_figures() -> None:
    shared("sst2")
    figures = measure()
    print(json.dumps(figures))
    for name, (_, target) in RECIPES.items():
        assert figures[name]["dev_acc_best"] >= target, (name, figures[name])
    assert figures["lora"]["trainable_params_max"] < 0.05 * 22.7e6


if __name__ == "__main__":
    print(json.dumps(measure()))
