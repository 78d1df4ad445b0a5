"""Run names put what varies first and stay short enough for the MLflow runs table."""

from __future__ import annotations

import pytest

from src.tracking.multirun import grid_dimensions
from src.tracking.naming import from_overrides, short_value


@pytest.mark.parametrize(
    ("value", "short"), [("0.00031", "3.1e-4"), ("2e-4", "2e-4"), ("0.01", "0.01"), ("10", "10"), ("lp_ft", "lp_ft")]
)
def test_short_value(value: str, short: str) -> None:
    assert short_value(value) == short


def test_names_put_groups_first_seed_last_and_drop_plumbing() -> None:
    overrides = ["seed=1", "optim.lr=0.0002", "finetune=lp_ft", "trainer.enable_progress_bar=false", "++sweep.trial=3"]
    assert from_overrides(overrides) == ["lp_ft", "lr=2e-4", "s1"]
    assert from_overrides(overrides, keys=["finetune", "seed"]) == ["lp_ft", "s1"]
    assert from_overrides(["regularization.weight_decay=0.01", "+trainer.max_epochs=3"]) == ["wd=0.01", "ep=3"]
    assert from_overrides(["data.train_path=../shared/data/sst2/train.tsv"]) == ["train_path=train.tsv"]


def test_grid_dimensions_split_swept_from_fixed() -> None:
    swept, fixed = grid_dimensions(["finetune=linear_probe,full", "seed=0,1", "trainer.max_epochs=2"])
    assert swept == {"finetune": "linear_probe,full", "seed": "0,1"} and fixed == {"trainer.max_epochs": "2"}


def test_grid_dimensions_strip_append_and_delete_prefixes() -> None:
    swept, fixed = grid_dimensions(["+recipe=digits_full,digits_lora", "~trainer.max_steps"])
    assert swept == {"recipe": "digits_full,digits_lora"}
