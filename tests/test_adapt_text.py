"""Domain adaptation on text with the packaged MiniLM: a tiny synthetic shift (film reviews -> product reviews, all
upper case), in-process through `src.run`, checked through the MLflow store it leaves."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from src.train import execute
from tests.conftest import REPO

SOURCE = {
    "pos": ["a wonderful, moving film", "great acting and a clever plot", "i loved every minute", "superb and funny"],
    "neg": ["a dull, lifeless mess", "boring and far too long", "i hated the ending", "clumsy and tedious"],
}
TARGET = {  # another domain and another surface form: the shift
    "pos": ["THIS BLENDER WORKS GREAT", "SOLID BUILD, VERY HAPPY", "BEST KETTLE I HAVE OWNED", "FAST AND RELIABLE"],
    "neg": ["BROKE AFTER TWO DAYS", "CHEAP PLASTIC, RETURNED IT", "THE LID LEAKS EVERYWHERE", "LOUD AND USELESS"],
}


def write_table(path: Path, texts: dict[str, list[str]], repeats: int, labelled: bool = True) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "sentiment"] if labelled else ["text"])
        for i in range(repeats):
            for label, rows in texts.items():
                writer.writerows([[f"{t} ({i})", label] if labelled else [f"{t} ({i})"] for t in rows])


@pytest.mark.slow  # MiniLM + DANN end to end (~45 s); tests/test_adapt.py covers every method on digits
def test_dann_on_a_synthetic_text_shift(tmp_path: Path) -> None:
    write_table(tmp_path / "train.csv", SOURCE, 3)
    write_table(tmp_path / "dev.csv", SOURCE, 1)
    write_table(tmp_path / "target.csv", TARGET, 3, labelled=False)
    write_table(tmp_path / "target_test.csv", TARGET, 1)
    overrides = [
        "experiment=sst2_minilm",
        f"data.train_path={tmp_path / 'train.csv'}",
        f"data.val_path={tmp_path / 'dev.csv'}",
        "data.test_path=null",
        f"data.target_path={tmp_path / 'target.csv'}",
        f"data.target_test_path={tmp_path / 'target_test.csv'}",
        "data.text_column=text",
        "data.label_column=sentiment",
        "data.batch_size=8",
        "data.max_train_samples=null",
        "adapt=dann",
        "adapt.hidden=32",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=2",
        "trainer.enable_progress_bar=false",
        "tracking.log_checkpoint=false",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"tracking.artifact_location={tmp_path / 'mlruns'}",
    ]
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        raw = compose("config", overrides=overrides)
    execute(raw)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("transfer-lab").experiment_id])
    metrics, run_id = found.data.metrics, found.info.run_id
    assert found.info.status == "FINISHED" and found.data.tags["adapt"] == "dann"
    for key in ("train/ce", "train/domain_loss", "train/domain_acc", "val/target_im", "val/target_snd", "target/acc"):
        assert len(client.get_metric_history(run_id, key)) == 2, key  # one value per epoch
    assert 0.0 <= metrics["test/target_acc"] <= 1.0
    selection = json.loads(Path(client.download_artifacts(run_id, "model_selection.json", str(tmp_path))).read_text())
    assert set(selection) == {"source_val", "im", "snd", "oracle", "checkpoint", "last"}
    assert metrics["select/oracle/target_acc"] == max(m.value for m in client.get_metric_history(run_id, "target/acc"))
