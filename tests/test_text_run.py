"""The packaged MiniLM end to end through the CLI on a user's own small tables (a headered CSV, a headerless
AG News-style CSV with class names, the same as Parquet): offline, 2 training batches."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import run_cli

POSITIVE = ["a wonderful, moving film", "great acting and a clever plot", "i loved every minute", "superb and funny"]
NEGATIVE = ["a dull, lifeless mess", "boring and far too long", "i hated the ending", "clumsy and tedious"]


def write_table(path: Path, repeats: int) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "sentiment"])
        for i in range(repeats):
            writer.writerows([[f" {t} ({i}) ", "pos"] for t in POSITIVE] + [[f"{t} ({i})", "neg"] for t in NEGATIVE])


def test_minilm_two_batch_finetune_offline(tmp_path: Path) -> None:
    write_table(tmp_path / "train.csv", 4)
    write_table(tmp_path / "dev.csv", 1)
    proc = run_cli(
        [
            "experiment=sst2_minilm",
            f"data.train_path={tmp_path / 'train.csv'}",
            f"data.val_path={tmp_path / 'dev.csv'}",
            "data.test_path=null",
            "data.text_column=text",
            "data.label_column=sentiment",
            "data.batch_size=8",
            "data.max_train_samples=null",
            "trainer.limit_train_batches=2",
            "tracking.log_checkpoint=false",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("transfer-lab").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["backbone"] == "minilm" and run.data.tags["data"] == "sst2"
    assert run.data.metrics["trainable_params"] > 20e6  # full fine-tuning of the 22.7M-parameter encoder
    assert len([k for k in run.data.metrics if k.startswith("lr-group-")]) == 9  # embeddings, 6 layers, pooler, head
    mapping = Path(client.download_artifacts(run.info.run_id, "label_mapping.json", str(tmp_path))).read_text()
    assert '"neg": 0' in mapping and '"pos": 1' in mapping


TOPICS = [
    ["election", "minister", "summit"],
    ["match", "goal", "coach"],
    ["market", "shares", "profit"],
    ["chip", "software", "research"],
]


def write_news(tmp_path: Path, n: int = 48) -> tuple[Path, Path]:
    """AG News as distributed: headerless ``"<class 1-4>","<title>","<description>"`` + a classes.txt."""
    rows = [
        [str(i % 4 + 1), f"{TOPICS[i % 4][i % 3]} news {i}", f"story {i} about the {' '.join(TOPICS[i % 4])}"]
        for i in range(n)
    ]
    with (tmp_path / "news.csv").open("w", newline="") as f:
        csv.writer(f, quoting=csv.QUOTE_ALL).writerows(rows)
    (tmp_path / "classes.txt").write_text("World\nSports\nBusiness\nSci/Tech\n")
    pq.write_table(
        pa.table({name: [r[i] for r in rows] for i, name in enumerate(NEWS_COLUMNS)}), tmp_path / "news.parquet"
    )
    return tmp_path / "news.csv", tmp_path / "news.parquet"


NEWS_COLUMNS = ["label", "title", "description"]


def run_news(tmp_path: Path, train: Path, *extra: str) -> Any:
    """A 2-batch MiniLM run on the news table from config only; returns its MLflow run."""
    proc = run_cli(
        [
            "experiment=sst2_minilm",
            f"data.train_path={train}",
            "data.val_path=null",
            "data.test_path=null",
            "data.val_fraction=0.25",
            "data.text_column=[title,description]",
            f"data.label_names={tmp_path / 'classes.txt'}",
            "data.max_train_samples=null",
            "data.batch_size=8",
            "trainer.limit_train_batches=2",
            "tracking.log_checkpoint=false",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            *extra,
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("transfer-lab").experiment_id
    return client, client.search_runs([experiment], order_by=["attributes.start_time DESC"])[0]


def test_headerless_news_csv_trains_from_config_with_class_names(tmp_path: Path) -> None:
    csv_path, _ = write_news(tmp_path)
    client, run = run_news(tmp_path, csv_path, "data.column_names=[label,title,description]")
    assert run.info.status == "FINISHED"
    mapping = json.loads(
        Path(client.download_artifacts(run.info.run_id, "label_mapping.json", str(tmp_path))).read_text()
    )
    assert mapping == {"World": 0, "Sports": 1, "Business": 2, "Sci/Tech": 3}
    assert "confusion_matrix.png" in {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.slow
def test_news_parquet_gives_the_same_metrics_as_csv(tmp_path: Path) -> None:
    csv_path, parquet_path = write_news(tmp_path)
    _, from_csv = run_news(tmp_path, csv_path, "data.column_names=[label,title,description]")
    _, from_parquet = run_news(tmp_path, parquet_path)
    metrics = [
        {k: v for k, v in run.data.metrics.items() if k.startswith(("val/", "test/"))}
        for run in (from_csv, from_parquet)
    ]
    assert metrics[0] == metrics[1] and "test/acc" in metrics[0]
