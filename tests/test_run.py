"""The CLI end to end on the default digits experiment, checked through the MLflow store it leaves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from src.finetune.init import backbone_state, resolve_checkpoint
from tests.conftest import run_cli

FAST = ["trainer.max_epochs=2"]


def client_for(cwd: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")


def runs(cwd: Path) -> list:
    client = client_for(cwd)
    experiment = client.get_experiment_by_name("transfer-lab")
    return client.search_runs([experiment.experiment_id])


@pytest.fixture(scope="module")
def single_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("single")
    proc = run_cli([*FAST, "seed=3"], cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd


def test_single_run_is_recorded(single_run: Path) -> None:
    (run,) = runs(single_run)
    client = client_for(single_run)
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert {tags["backbone"], tags["finetune"], tags["data"], tags["seed"]} == {"small_cnn", "full", "digits", "3"}
    assert len(tags["git_commit"]) == 40
    params = run.data.params
    assert params["optim.lr"] == "0.003" and params["trainer.max_epochs"] == "2" and params["seed"] == "3"
    assert "None" not in params.values() and "finetune.init_from" not in params, "unset values are omitted"
    assert run.info.run_name.startswith("full·ep=2·s3·")
    assert tags["mlflow.source.git.commit"] == tags["git_commit"] and tags["mlflow.user"]
    assert tags["mlflow.source.name"].startswith("python -m src.run") and "full" in tags["mlflow.note.content"]
    assert tags["health"] == "ok" and run.data.metrics["best/val/acc"] >= run.data.metrics["val/acc"]
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "digits" and '"num_train": 50' in dataset.dataset.profile
    for key in ("val/acc", "val/f1", "val/auroc", "train/loss", "lr-group-0", "trainable_params"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == [0, 1], key
    for key in ("test/acc", "test/precision", "test/recall", "test/f1", "test/auroc"):
        assert 0.0 <= run.data.metrics[key] <= 1.0
    assert run.data.metrics["test/acc"] > 0.5, "transfer from digits 0-4 should beat chance on 5-9 quickly"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "overrides.txt", "confusion_matrix.png", "label_mapping.json", "checkpoints"} <= artifacts
    config_yaml = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(single_run))).read_text()
    assert "max_epochs: 2" in config_yaml
    assert (single_run / "mlruns").is_dir(), "artifacts live under ./mlruns of the launch directory"
    assert not list(single_run.glob("outputs/**/mlflow.db")), "the store must not land in Hydra's output dir"


def test_terminal_shows_each_line_once_without_download_bars(tmp_path: Path) -> None:
    """A default run's whole terminal output: Lightning's lines once (not also through its own handler), no
    MLflow "Downloading artifacts" bar at the model log, and a URL that opens the run in the runs view."""
    proc = run_cli(["trainer.max_epochs=1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    repeated = {line for line in lines if lines.count(line) > 1 and any(c.isalnum() for c in line)}
    assert not repeated, repeated
    assert "Seed set to 0" in output and "INFO: Seed set to" not in output, "Lightning logs through Hydra's handler"
    assert "Downloading artifacts" not in output
    (run,) = runs(tmp_path)
    assert f"/runs/{run.info.run_id}?workflowType=machine_learning" in proc.stdout


def test_init_from_an_earlier_run(single_run: Path) -> None:
    (first,) = runs(single_run)
    proc = run_cli(
        ["trainer.max_epochs=1", f"finetune.init_from={first.info.run_id}", "finetune=linear_probe"], single_run
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    latest = max(runs(single_run), key=lambda r: r.info.start_time)
    assert latest.data.params["finetune.init_from"] == first.info.run_id
    # The probe froze the backbone it was given, so its logged backbone weights are exactly the first run's.
    first_w, latest_w = (
        backbone_state(resolve_checkpoint(r.info.run_id, client_for(single_run))) for r in (first, latest)
    )
    weights = [k for k in first_w if "running_" not in k and "num_batches" not in k]
    assert weights and all(torch.equal(first_w[k], latest_w[k]) for k in weights)


def test_crash_is_recorded_as_failed(tmp_path: Path) -> None:
    proc = run_cli(["trainer.max_epochs=1", "finetune.init_from=/no/such/checkpoint.ckpt"], tmp_path)
    assert proc.returncode != 0
    (run,) = runs(tmp_path)
    assert run.info.status == "FAILED"
    assert "init_from" in run.data.tags["error"]
    artifacts = {a.path for a in client_for(tmp_path).list_artifacts(run.info.run_id)}
    assert "error.txt" in artifacts


def test_multirun_grid_is_one_parent_with_a_child_per_job(tmp_path: Path) -> None:
    proc = run_cli(["-m", "finetune=linear_probe,full", "seed=0,1", "trainer.max_epochs=1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = runs(tmp_path)
    (parent,) = [r for r in found if r.data.tags.get("role") == "grid"]
    children = [r for r in found if r is not parent]
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in found)
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    assert {r.info.run_name for r in children} == {"linear_probe·s0", "linear_probe·s1", "full·s0", "full·s1"}
    assert parent.info.run_name == "grid·finetune=linear_probe,full·seed=0,1"
    grid = {"grid.finetune": "linear_probe,full", "grid.seed": "0,1", "fixed.trainer.max_epochs": "1"}
    assert grid.items() <= parent.data.params.items()
    best = max(children, key=lambda r: r.data.metrics["best/val/acc"])
    assert parent.data.tags["best_run_id"] == best.info.run_id
    assert parent.data.metrics["best/val/acc"] == best.data.metrics["best/val/acc"]
    summary = Path(client_for(tmp_path).download_artifacts(parent.info.run_id, "summary.md", str(tmp_path))).read_text()
    assert summary.count("FINISHED") == 4 and best.info.run_id in summary.splitlines()[2]
    assert summary.strip() in parent.data.tags["mlflow.note.content"], "the UI shows the table as the description"
    assert {r.data.tags["job_num"] for r in children} == {"0", "1", "2", "3"}
    # tracking.keep_models=best: a job keeps its weights (model + checkpoint) only if no finished job beat it.
    client = client_for(tmp_path)
    models = client.search_logged_models([parent.info.experiment_id])
    with_model = {m.source_run_id for m in models}
    with_checkpoint = {
        r.info.run_id for r in children if "checkpoints" in {a.path for a in client.list_artifacts(r.info.run_id)}
    }
    values = [r.data.metrics["best/val/acc"] for r in sorted(children, key=lambda r: int(r.data.tags["job_num"]))]
    ordered = sorted(children, key=lambda r: int(r.data.tags["job_num"]))
    kept = {r.info.run_id for i, r in enumerate(ordered) if values[i] >= max(values[: i + 1])}
    assert with_model == with_checkpoint == kept and best.info.run_id in kept
    assert len({r.data.tags["multirun_dir"] for r in found}) == 1
    assert f"under parent run {parent.info.run_id}" in proc.stdout
    assert f"#/experiments/{parent.info.experiment_id}?workflowType=machine_learning" in proc.stdout


@pytest.mark.slow
def test_a_grid_runs_on_parallel_joblib_workers(tmp_path: Path) -> None:
    """`hydra/launcher=joblib` on a grid: the workers get Hydra's callbacks pickled, the grid's parent with them."""
    launcher = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    proc = run_cli(["-m", "finetune=linear_probe,full", "trainer.max_epochs=1", *launcher], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = runs(tmp_path)
    (parent,) = [r for r in found if r.data.tags.get("role") == "grid"]
    children = [r for r in found if r is not parent]
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in found)
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert f"2 runs (2 FINISHED, 0 not) under parent run {parent.info.run_id}" in proc.stdout


def _open_run(args: tuple[str, int]) -> str:
    from src.tracking.mlflow_run import MLflowRun, TrackingConfig

    base, i = args
    with MLflowRun(TrackingConfig(), Path(base), f"parallel-{i}", {}) as tracker:
        return tracker.run_id


def test_parallel_first_runs_share_a_fresh_store(tmp_path: Path) -> None:
    """Parallel jobs that meet a not-yet-created SQLite store must not race MLflow's schema migration."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(2) as pool:
        run_ids = pool.map(_open_run, [(str(tmp_path), i) for i in range(2)])
    assert len(set(run_ids)) == 2
    assert {r.info.status for r in runs(tmp_path)} == {"FINISHED"}


def test_urls_open_the_runs_view_and_a_long_table_fits_the_note() -> None:
    from src.tracking.summary import NOTE_LIMIT, _note, where

    assert where("sqlite:///mlflow.db", "1", "abc").endswith("/#/experiments/1/runs/abc?workflowType=machine_learning")
    assert where("http://host:5000/", "1").endswith("host:5000/#/experiments/1?workflowType=machine_learning")
    table = "\n".join(["| run |", "|---|", *(f"| row {i:05d} |" for i in range(2000))])
    note = _note(table, 2000, "val/acc")
    assert len(note) <= NOTE_LIMIT and "| row 00000 |" in note and "summary.md" in note.splitlines()[0]


@pytest.mark.slow
def test_ddp_launch_records_one_run_logged_once(tmp_path: Path) -> None:
    """`trainer=ddp` through the CLI (2 gloo ranks on CPU): Lightning relaunches the script for rank 1, which must
    attach to rank 0's MLflow run instead of opening its own, and write nothing to it."""
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
    proc = run_cli([*ddp, *FAST, "finetune=gradual_unfreeze"], tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = runs(tmp_path)
    assert run.info.status == "FINISHED" and run.data.tags["health"] == "ok"
    client = client_for(tmp_path)
    history = client.get_metric_history(run.info.run_id, "trainable_params")
    trainable = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert len(trainable) == 2 and trainable[0] < trainable[1], "the unfreezing schedule ran under DDP"
    assert len(client.get_metric_history(run.info.run_id, "test/acc")) == 1, "test metrics logged once"
    assert proc.stdout.count("FINISHED:") == 1, "one summary, from rank 0"
