"""The task layer on small real inputs: how each task reads labels (and refuses bad ones, naming file and line),
what it refuses before compute, and a regression run end to end whose logged model predicts raw sentence pairs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from src.backbones.base import Preprocessing
from src.config import validate
from src.data import DATA
from src.schema import ConfigError
from src.tasks import TASKS
from tests.conftest import shared
from tests.test_failures import composed, run_in_process

TAGS = ["anger", "joy", "love"]


def write(path: Path, header: list[str], rows: list[list[object]], delimiter: str = ",") -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def setup(node: dict, preprocessing: Preprocessing, task: str, **task_cfg: object):
    dm = DATA.build(node, preprocessing=preprocessing, seed=0, task=TASKS.build({"name": task, **task_cfg}))
    dm.setup("fit")
    return dm


def tag_rows(n: int = 30) -> list[list[str]]:
    """Tags by index and by name, empty rows included (an example with no tag is allowed)."""
    cells = ["0,1", "joy", "", "2", "anger,love", "1,2"]
    return [[f"comment number {i}", cells[i % len(cells)]] for i in range(n)]


def test_multilabel_reads_separated_tags_by_name_or_index(tmp_path: Path, text_pre: Preprocessing) -> None:
    path = write(tmp_path / "train.csv", ["text", "tags"], tag_rows())
    node = {"name": "text_table", "train_path": str(path), "text_column": "text", "label_column": "tags"}
    dm = setup({**node, "label_separator": ",", "label_names": TAGS, "val_fraction": 0.3}, text_pre, "multilabel")
    assert dm.names == TAGS and dm.task.num_outputs == 3
    labels = np.concatenate([dm.splits["train"].labels, dm.splits["val"].labels])
    assert labels.shape == (30, 3) and (labels.sum(1) == 0).sum() == 5  # the empty rows are examples
    batch = next(iter(dm.train_dataloader()))
    assert batch["labels"].shape[1] == 3 and batch["labels"].dtype.is_floating_point


def test_multilabel_bad_inputs_name_file_and_line(tmp_path: Path, text_pre: Preprocessing) -> None:
    node = {"name": "text_table", "text_column": "text", "label_column": "tags", "label_names": TAGS}
    rows = tag_rows()
    rows[7][1] = "joy,sadness"
    path = write(tmp_path / "unknown.csv", ["text", "tags"], rows)
    with pytest.raises(
        ConfigError, match=r"unknown\.csv has 1 row\(s\) with invalid labels, e\.g\. unknown tag 'sadness'.*line\(s\) 9"
    ):
        setup({**node, "train_path": str(path), "label_separator": ","}, text_pre, "multilabel")
    path = write(tmp_path / "semicolon.csv", ["text", "tags"], [[r[0], r[1].replace(",", ";")] for r in tag_rows()])
    with pytest.raises(ConfigError, match=r"label_separator: ',' occurs in no label .* but ';' does"):
        setup({**node, "train_path": str(path), "label_separator": ","}, text_pre, "multilabel")
    indicator = [[f"text {i}", i % 2, (i + 1) % 2, 1] for i in range(20)]
    indicator[4][2] = 2
    path = write(tmp_path / "columns.csv", ["text", *TAGS], indicator)
    columns = {"name": "text_table", "train_path": str(path), "text_column": "text", "label_column": TAGS}
    with pytest.raises(ConfigError, match=r"columns\.csv has .*column 'joy' holds '2', not 0/1.*line\(s\) 6"):
        setup(columns, text_pre, "multilabel")


def test_multilabel_reads_indicator_columns_and_json_lists(tmp_path: Path, text_pre: Preprocessing) -> None:
    path = write(
        tmp_path / "columns.csv", ["text", *TAGS], [[f"text {i}", i % 2, (i + 1) % 2, i % 3 == 0] for i in range(20)]
    )
    dm = setup(
        {"name": "text_table", "train_path": str(path), "text_column": "text", "label_column": TAGS},
        text_pre,
        "multilabel",
    )
    assert dm.names == TAGS
    lines = tmp_path / "train.jsonl"
    lines.write_text("".join(json.dumps({"text": f"t{i}", "tags": TAGS[: i % 3 + 1]}) + "\n" for i in range(20)))
    dm = setup(
        {"name": "text_table", "train_path": str(lines), "text_column": "text", "label_column": "tags"},
        text_pre,
        "multilabel",
    )
    assert dm.names == sorted(TAGS)


def test_regression_reads_stsb_and_refuses_non_numeric_targets(tmp_path: Path, text_pre: Preprocessing) -> None:
    source = pd.read_csv(shared("stsb", "train.tsv"), sep="\t", quoting=3, nrows=120)[
        ["sentence1", "sentence2", "score"]
    ]
    node = {"name": "text_table", "text_column": "sentence1", "text_pair_column": "sentence2", "label_column": "score"}
    path = write(tmp_path / "train.tsv", list(source.columns), source.values.tolist(), "\t")
    dm = setup({**node, "train_path": str(path), "max_train_per_class": 3}, text_pre, "regression")
    assert dm.names == ["score"] and dm.splits["train"].labels.dtype == np.float32
    assert len(dm.splits["train"]) <= 30  # per-bin caps: 3 per quantile bin of the score
    assert abs(float(dm.task.mean) - source.score.mean()) < 1.0
    with pytest.raises(ConfigError, match=r"looks continuous.*set task=regression"):
        setup({**node, "train_path": str(path)}, text_pre, "classification")
    rows = source.values.tolist()
    rows[4][2] = "high"
    path = write(tmp_path / "bad.tsv", list(source.columns), rows, "\t")
    with pytest.raises(
        ConfigError, match=r"bad\.tsv has 1 non-numeric target\(s\), e\.g\. 'high' in column 'score' \(line\(s\) 6\)"
    ):
        setup({**node, "train_path": str(path)}, text_pre, "regression")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["task=regression"], "data: digits is single-label classification"),
        (["task=multilabel", "adapt=dann", "data.target_shift=invert"], "adapt: domain adaptation"),
        (["task=regression", "regularization.label_smoothing=0.1"], "regularization.label_smoothing: smooths class"),
        (["task=multilabel", "task.threshold=1.5"], "task.threshold: a probability in (0, 1) or 'tune'"),
        (["task=regression", "task.loss=hinge"], "task.loss: must be one of mse, huber, l1"),
    ],
)
def test_what_a_task_cannot_use_is_refused_at_validation(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(composed(*overrides))
    assert str(err.value).startswith(message)


def test_the_objective_follows_the_task() -> None:
    assert (
        validate(
            composed("task=regression", "data=text_table", "data.train_path=pyproject.toml", "data.format=csv")
        ).objective.metric
        == "val/spearman"
    )
    assert (
        validate(
            composed("task=multilabel", "data=text_table", "data.train_path=pyproject.toml", "data.format=csv")
        ).objective.metric
        == "val/macro_f1"
    )


def test_stsb_regression_run_logs_task_metrics_and_serves_original_units(tmp_path: Path) -> None:
    source = pd.read_csv(shared("stsb", "train.tsv"), sep="\t", quoting=3)[["sentence1", "sentence2", "score"]]
    write(tmp_path / "train.tsv", list(source.columns), source.iloc[:96].values.tolist(), "\t")
    write(tmp_path / "dev.tsv", list(source.columns), source.iloc[96:160].values.tolist(), "\t")
    status = run_in_process(
        tmp_path,
        "experiment=stsb_minilm",
        "finetune=lp_ft",
        "finetune.probe_fit=true",
        "finetune.probe_epochs=0",
        f"data.train_path={tmp_path / 'train.tsv'}",
        f"data.val_path={tmp_path / 'dev.tsv'}",
        "data.max_length=48",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
    )
    assert status == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("transfer-lab").experiment_id])
    metrics = run.data.metrics
    assert run.info.status == "FINISHED" and run.data.tags["health"] in ("ok", "constant")
    assert {"test/spearman", "test/rmse", "test/mae", "best/val/spearman"} <= set(metrics)
    assert metrics["test/spearman"] > 0.2, "an LP-FT probe on MiniLM features ranks similar pairs higher"
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    pairs = pd.DataFrame(
        {
            "sentence1": ["A man is playing a guitar.", "A cat sleeps."],
            "sentence2": ["A man plays the guitar.", "The stock market fell."],
        }
    )
    predicted = model.predict(pairs)
    assert list(predicted.columns) == ["pred_score"]
    assert predicted.pred_score[0] > predicted.pred_score[1] and 0 < predicted.pred_score.mean() < 6


# --- images listed in a manifest (data=image_manifest) ------------------------------------------------------------

ROUND = {0, 6, 8, 9}  # digits drawn with a closed loop


def digit_manifest(folder: Path, n: int, start: int = 0) -> Path:
    """Real 8x8 digits saved as PNGs beside a manifest: multi-label tags (even / big / round), the digit as a
    number, and the image path relative to the manifest."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(start, start + n):
        name = f"img/{i}.png"
        Image.fromarray(np.uint8(digits.images[i] * 255 / 16)).save(folder / name)
        d = int(digits.target[i])
        tags = [t for t, on in (("even", d % 2 == 0), ("big", d >= 5), ("round", d in ROUND)) if on]
        rows.append([name, ",".join(tags), d])
    return write(folder / "manifest.csv", ["path", "tags", "digit"], rows)


def test_image_manifest_reads_tags_and_numbers_and_names_bad_rows(tmp_path: Path) -> None:
    pre = Preprocessing(modality="image", channels=1, image_size=8, mean=[0.5], std=[0.5])
    path = digit_manifest(tmp_path, 40)
    node = {"name": "image_manifest", "train_path": str(path), "image_column": "path", "val_fraction": 0.25}
    tags = setup({**node, "label_column": "tags", "label_separator": ","}, pre, "multilabel")
    assert tags.names == ["big", "even", "round"]
    assert len(tags.splits["train"]) + len(tags.splits["val"]) == 40 and 8 <= len(tags.splits["val"]) <= 12
    batch = next(iter(tags.train_dataloader()))
    assert batch["pixel_values"].shape[1:] == (1, 8, 8) and batch["labels"].shape[1] == 3
    numbers = setup({**node, "label_column": "digit"}, pre, "regression")
    targets = np.concatenate([numbers.splits["train"].labels, numbers.splits["val"].labels]).ravel()
    rows = list(csv.reader(path.open()))
    assert sorted(targets.tolist()) == sorted(float(row[2]) for row in rows[1:]), "targets in original units"

    rows[3][0], rows[5][0] = "img/nowhere.png", "manifest.csv"  # a missing file, a file that is not an image
    broken = write(tmp_path / "broken.csv", rows[0], rows[1:])
    with pytest.raises(ConfigError, match=r"broken\.csv: 2 row\(s\) with a missing image file on line\(s\) 4; a file"):
        setup({**node, "train_path": str(broken), "label_column": "digit"}, pre, "regression")
    skipped = setup({**node, "train_path": str(broken), "label_column": "digit", "bad_rows": "skip"}, pre, "regression")
    assert len(skipped.splits["train"]) + len(skipped.splits["val"]) == 38


def test_image_manifest_multilabel_run_tunes_thresholds_and_serves_image_paths(tmp_path: Path) -> None:
    """A real multi-label image run (small CNN pretrained on digits, tags of other digits): per-tag thresholds
    tuned on validation are stored with the model, and the logged model takes image paths."""
    train = digit_manifest(tmp_path / "train", 240)
    val = digit_manifest(tmp_path / "val", 120, start=240)
    status = run_in_process(
        tmp_path,
        "task=multilabel",
        "task.threshold=tune",
        "task.pos_weight=true",
        "data=image_manifest",
        f"data.train_path={train}",
        f"data.val_path={val}",
        "data.image_column=path",
        "data.label_column=tags",
        "data.label_separator=','",
        "backbone=small_cnn",
        "finetune=full",
        "trainer.max_epochs=4",
        "trainer.enable_progress_bar=false",
    )
    assert status == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("transfer-lab").experiment_id])
    assert run.info.status == "FINISHED" and run.data.metrics["test/macro_f1"] > 0.6
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "per_label_f1.json", str(tmp_path))).read_text())
    assert sorted(table) == ["big", "even", "round"]
    thresholds = {name: row["threshold"] for name, row in table.items()}
    assert any(t != 0.5 for t in thresholds.values()), "thresholds were tuned on validation"
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    predicted = model.predict(
        pd.DataFrame({"image": [str(tmp_path / "val" / "img" / f"{i}.png") for i in range(240, 250)]})
    )
    assert list(predicted.columns) == ["labels", "prob_big", "prob_even", "prob_round"]
    chosen = [set(json.loads(cell)) for cell in predicted.labels]
    probs = predicted[[f"prob_{n}" for n in ("big", "even", "round")]].to_numpy()
    assert chosen == [
        {n for n, p in zip(("big", "even", "round"), row, strict=True) if p >= thresholds[n]} for row in probs
    ]
