"""The packaged MiniLM end to end through the CLI on a user's own small CSV: offline, 2 training batches."""

from __future__ import annotations

import csv
from pathlib import Path

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
