"""Config validation: bad values fail before any compute with one message naming the key."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from src.config import ConfigError, validate
from tests.conftest import REPO, composed, run_cli


def test_default_config_validates() -> None:
    cfg = validate(composed())
    assert cfg.data.name == "digits" and cfg.backbone.name == "small_cnn" and cfg.finetune.name == "full"
    assert cfg.trainer["max_epochs"] > 0


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optim.lr=-1", "optim.lr"),
        ("optim.scheduler=steps", "optim.scheduler"),
        ("optim.layer_decay=1.5", "optim.layer_decay"),
        ("regularization.label_smoothing=1.0", "regularization.label_smoothing"),
        ("data.batch_size=abc", "data.batch_size"),
        ("+optim.momentun=0.8", "optim.momentun"),
        ("objective.direction=up", "objective.direction"),
        ("objective.metric=train/loss", "objective.metric"),
        ("seed=-3", "seed"),
        ("finetune.name=freeze_all", "finetune.name"),
    ],
)
def test_bad_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')}:"):
        validate(composed(override))


def test_cli_rejects_bad_config_before_compute(tmp_path: Path) -> None:
    proc = run_cli(["optim.lr=-0.1"], tmp_path, timeout=120)
    assert proc.returncode != 0
    assert proc.returncode == 2 and proc.stderr.strip() == "Error: optim.lr: must be > 0; got -0.1"
    assert not (tmp_path / "mlflow.db").exists(), "no run may start for an invalid config"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=abc", "Error: optim.lr: Value 'abc' of type 'str' could not be converted to Float"),
        ("trainer.max_epochs=0", "Error: trainer.max_epochs: must be >= 1 (or -1 with trainer.max_steps > 0); got 0"),
    ],
)
def test_cli_reports_config_mistake_without_heavy_imports(tmp_path: Path, override: str, message: str) -> None:
    """A config mistake is answered before torch, Lightning or MLflow load (~0.7 s idle, was ~12 s): `-X importtime`
    lists every module the CLI imported. The time bound leaves room for a loaded machine."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "src.run", override],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.perf_counter() - start
    lines = proc.stderr.splitlines()
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in lines if line.startswith("import time:")}
    assert proc.returncode == 2
    assert [line for line in lines if not line.startswith("import time:")] == [message]
    assert not imported & {"torch", "lightning", "mlflow", "torchmetrics", "transformers", "pyarrow"}
    assert elapsed < 6, f"a config mistake took {elapsed:.1f} s"
    assert not (tmp_path / "mlflow.db").exists()


def test_missing_data_file_fails_at_validation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^data\.train_path: no such file"):
        validate(composed("data=text_table", f"data.train_path={tmp_path / 'absent.tsv'}"))
