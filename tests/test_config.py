"""Config validation: bad values fail before any compute with one message naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from src.config import ConfigError, validate
from tests.conftest import REPO, run_cli


def composed(*overrides: str):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


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
        ("+trainer.max_epohs=3", "trainer.max_epohs"),
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


def test_missing_data_file_fails_at_validation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^data\.train_path: no such file"):
        validate(composed("data=text_table", f"data.train_path={tmp_path / 'absent.tsv'}"))
