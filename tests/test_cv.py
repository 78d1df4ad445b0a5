"""k-fold cross-validation: folds are disjoint, cover the training data and keep each stratum's share; a fold's run
validates on it; bad fold settings are refused before compute; `src.compare` pairs replicates by fold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from src.backbones.base import Preprocessing
from src.compare.analysis import Group
from src.compare.runs import RunRecord
from src.compare.stats import difference
from src.config import CVConfig, validate
from src.data import DATA
from src.data.common import fold_split
from src.schema import ConfigError
from tests.conftest import classification, run_cli
from tests.test_failures import composed, restore_signals, run_in_process  # noqa: F401 (fixture)
from tests.test_tasks import write


def test_folds_are_disjoint_cover_the_data_and_keep_class_shares() -> None:
    labels = [0] * 23 + [1] * 12 + [2] * 5
    vals = [fold_split(labels, 5, fold, seed=3) for fold in range(5)]
    for train, val in vals:
        assert not set(train) & set(val) and sorted([*train, *val]) == list(range(len(labels)))
        counts = np.bincount(np.asarray(labels)[val], minlength=3)
        assert all(abs(c - n / 5) < 1 for c, n in zip(counts, (23, 12, 5), strict=True)), counts
    everything = np.concatenate([val for _, val in vals])
    assert sorted(everything.tolist()) == list(range(len(labels)))  # each example validates exactly once
    assert [v.tolist() for _, v in vals] == [fold_split(labels, 5, f, seed=3)[1].tolist() for f in range(5)]
    assert vals[0][1].tolist() != fold_split(labels, 5, 0, seed=4)[1].tolist()  # the seed reshuffles the folds


def reviews(tmp_path: Path, n: int = 40) -> Path:
    rows = [
        [f"{'great lovely fine' if i % 2 else 'awful bad poor'} review {i}", "pos" if i % 2 else "neg"]
        for i in range(n)
    ]
    return write(tmp_path / "reviews.csv", ["text", "label"], rows)


def test_a_text_table_fold_validates_on_its_fold_only(tmp_path: Path, text_pre: Preprocessing) -> None:
    node = {"name": "text_table", "train_path": str(reviews(tmp_path)), "text_column": "text"}
    seen, keys = [], set()
    for fold in range(4):
        dm = DATA.build(node, preprocessing=text_pre, seed=0, task=classification(), cv=CVConfig(folds=4, fold=fold))
        dm.setup("fit")
        train, val = dm.splits["train"].rows, dm.splits["val"].rows
        assert len(val) == 10 and not set(train) & set(val) and len(train) + len(val) == 40
        assert sorted(np.bincount(dm.splits["val"].labels).tolist()) == [5, 5]
        seen.extend(val.tolist())
        keys.add(str(dm.identity()))
    assert sorted(seen) == list(range(40)) and len(keys) == 4  # each fold its own cache identity


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["cv.folds=5", "cv.fold=5"], "cv.fold: must be in 0..4 (cv.folds=5); got 5"),
        (["cv.fold=2"], "cv.fold: 2 given without cv.folds"),
        (["cv.folds=1"], "cv.folds: must be >= 2 or null; got 1"),
        (["cv.folds=3"], "cv.folds: draws each validation fold from the training data, but data.val_per_class"),
    ],
)
def test_bad_fold_settings_are_refused_at_validation(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        validate(composed(*overrides))
    assert str(e.value).startswith(message), str(e.value)


def test_a_given_validation_file_is_refused_with_folds(tmp_path: Path) -> None:
    path = reviews(tmp_path)
    with pytest.raises(ConfigError, match=r"^cv.folds: .* but data.val_path is set; drop it"):
        validate(composed("data=text_table", f"data.train_path={path}", f"data.val_path={path}", "cv.folds=3"))


@pytest.mark.usefixtures("restore_signals")
def test_more_folds_than_the_smallest_class_stops_before_compute(tmp_path: Path, capsys) -> None:
    rows = [[f"text {i}", "rare" if i < 3 else "common"] for i in range(30)]
    path = write(tmp_path / "t.csv", ["text", "label"], rows)
    overrides = ["data=text_table", f"data.train_path={path}", "data.text_column=text", "backbone=minilm"]
    assert run_in_process(tmp_path, *overrides, "finetune=linear_probe", "cv.folds=5", "cv.fold=0") == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "Error: cv.folds: 5 folds, but the training data's smallest stratum (a class, rarest tag or target bin) has "
        "only 3 example(s); every fold needs one of each: use cv.folds <= 3"
    )
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("transfer-lab")
    assert experiment is None or all(r.info.status != "RUNNING" for r in client.search_runs([experiment.experiment_id]))


@pytest.mark.usefixtures("restore_signals")
def test_a_fold_run_records_its_fold(tmp_path: Path) -> None:
    path = reviews(tmp_path, 60)
    overrides = [
        "data=text_table",
        f"data.train_path={path}",
        "data.text_column=text",
        "backbone=minilm",
        "finetune=linear_probe",
        "trainer.max_epochs=1",
        "cv.folds=3",
        "cv.fold=2",
        "tracking.log_model=false",
        "tracking.log_checkpoint=false",
    ]
    assert run_in_process(tmp_path, *overrides) == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("transfer-lab").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["cv.folds"] == "3" and run.data.params["cv.fold"] == "2"


def record(seed: int, fold: int, value: float) -> RunRecord:
    params = {"cv.folds": "5", "cv.fold": str(fold)}
    return RunRecord(run_id=f"r{seed}{fold}", name="", params=params, tags={}, seed=seed, start_ms=0, val=value)


def group(runs: list[RunRecord]) -> Group:
    return Group({}, runs, None, None, None, None, None, None, ())  # type: ignore[arg-type]


def test_compare_pairs_replicates_by_fold_and_seed() -> None:
    """Fold 3 is hard for both strategies: pairing by (seed, fold) removes that shared noise."""
    hard = {3: -0.2}
    a = group([record(s, f, 0.80 + hard.get(f, 0) + 0.001 * s) for s in (0, 1) for f in range(5)])
    b = group([record(s, f, 0.78 + hard.get(f, 0) + 0.001 * s) for s in (0, 1) for f in range(5)])
    assert set(a.by_seed("val")) == {(s, str(f)) for s in (0, 1) for f in range(5)}
    gap = difference(a.by_seed("val"), b.by_seed("val"), 0.95)
    assert gap.paired and gap.mean == pytest.approx(0.02) and not gap.contains(0.0)


def test_a_fold_grid_parent_reports_the_mean_and_interval_over_folds(tmp_path: Path) -> None:
    """`-m cv.fold=range(k)` through the CLI (Hydra's multirun is what is tested): one parent, k children."""
    path = reviews(tmp_path, 60)
    args = ["-m", "data=text_table", f"data.train_path={path}", "data.text_column=text", "backbone=minilm"]
    args += ["finetune=linear_probe", "trainer.max_epochs=1", "tracking.log_model=false", "cv.folds=3"]
    proc = run_cli([*args, "cv.fold=range(3)"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "over 3 folds (mean, 95 % t-interval): best/val/acc " in proc.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("transfer-lab").experiment_id])
    (parent,) = [r for r in runs if "cv/mean/best/val/acc" in r.data.metrics]
    folds = sorted(r.data.params["cv.fold"] for r in runs if r.info.run_id != parent.info.run_id)
    assert folds == ["0", "1", "2"]
    children = [r.data.metrics["best/val/acc"] for r in runs if r.info.run_id != parent.info.run_id]
    assert parent.data.metrics["cv/mean/best/val/acc"] == pytest.approx(sum(children) / 3)


def test_folds_are_cut_from_the_capped_training_subset(tmp_path: Path, text_pre: Preprocessing) -> None:
    """k-fold at 5 examples per class validates on a fold of those 10, not on a fifth of the whole table."""
    node = {"name": "text_table", "train_path": str(reviews(tmp_path)), "text_column": "text", "max_train_per_class": 5}
    rows = set()
    for fold in range(5):
        dm = DATA.build(node, preprocessing=text_pre, seed=0, task=classification(), cv=CVConfig(folds=5, fold=fold))
        dm.setup("fit")
        train, val = dm.splits["train"].rows, dm.splits["val"].rows
        assert (len(train), len(val)) == (8, 2) and sorted(np.bincount(dm.splits["val"].labels).tolist()) == [1, 1]
        rows |= {*train.tolist(), *val.tolist()}
    assert len(rows) == 10  # the same 10-example subset in every fold
