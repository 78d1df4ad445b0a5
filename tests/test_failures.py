"""No silent failures: every bad input, divergence and signal ends in one clear line, a non-zero exit and no run
left RUNNING. Most cases run in-process through `src.run.execute` (what `main` runs after Hydra composes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from mlflow.tracking import MlflowClient

from src import preflight
from src.backbones import BACKBONES
from src.config import validate
from src.context import HydraContext
from src.data import DATA
from src.health import HealthCheck
from src.schema import ConfigError
from src.tracking.mlflow_run import store_lock
from src.train import execute
from tests.conftest import REPO, classification, composed
from tests.test_freeze import build as build_pieces
from tests.test_freeze import trainer as bare_trainer

QUICK = ["trainer.max_epochs=2", "trainer.enable_progress_bar=false", "tracking.log_checkpoint=false"]


@pytest.fixture
def restore_signals():
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, h in handlers.items():
        signal.signal(s, h)


def run_in_process(cwd: Path, *overrides: str) -> int:
    """`python -m src.run OVERRIDES` in `cwd` without a subprocess; returns the exit status."""
    context = HydraContext(cwd, cwd / "outputs" / "run", None, None, list(overrides), {})
    context.output_dir.mkdir(parents=True)
    old = Path.cwd()
    os.chdir(cwd)
    try:
        execute(composed(*overrides), context)
        return 0
    except SystemExit as e:
        return int(e.code)
    finally:
        os.chdir(old)


def only_run(cwd: Path):
    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("transfer-lab").experiment_id])
    return run


# --- knowable up front: one line, exit 2, no run ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("objective.metric=val/accuracy", "objective.metric: 'val/accuracy' is never logged; choose one of val/acc"),
        ("trainer.max_epochs=0", "trainer.max_epochs: must be >= 1"),
        ("+trainer.max_epohs=3", "trainer.max_epohs: not an argument of lightning.pytorch.Trainer"),
        ("trainer.accelerator=gpu", "trainer: "),
        ("trainer.precision=bf17", "trainer: "),
        ("tracking.uri=http://127.0.0.1:9", "tracking.uri: no MLflow server answers at http://127.0.0.1:9"),
    ],
)
def test_preflight_rejects_before_compute(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        preflight.check(validate(composed(override)), Path.cwd())
    assert str(err.value).startswith(message)


def test_unwritable_tracking_store_names_tracking_uri(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"^tracking.uri: cannot write the MLflow store"):
        preflight.check(validate(composed(f"tracking.uri=sqlite:///{blocker}/mlflow.db")), tmp_path)


def test_source_classes_feed_pretraining_and_may_not_overlap_the_targets() -> None:
    assert validate(composed("data.source_classes=[0,1,2]")).backbone.pretrain_classes == [0, 1, 2]
    assert validate(composed()).backbone.pretrain_classes == [0, 1, 2, 3, 4]
    with pytest.raises(ConfigError, match=r"^backbone.pretrain_classes: \[0, 1, 5\] overlaps data.target_classes"):
        validate(composed("backbone.pretrain_classes=[0,1,5]"))
    validate(composed("backbone.pretrain_classes=[0,1,5]", "backbone.pretrain=null"))  # no pretraining: no overlap


def test_cache_dir_that_is_a_file_names_cache_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for directory in (blocker, blocker / "sub"):
        with pytest.raises(ConfigError, match=rf"^cache.dir: {directory} is not a directory \({blocker} is a file\)"):
            preflight.check(validate(composed(f"cache.dir={directory}")), tmp_path)


def test_resume_of_a_run_id_not_in_the_store_names_the_id(tmp_path: Path, capsys, restore_signals) -> None:
    assert run_in_process(tmp_path, "resume=0123abcd") == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("Error: resume: no run '0123abcd' in ")


def test_cli_error_is_one_line_exit_2_no_run_no_output_folder(tmp_path: Path, capsys, restore_signals) -> None:
    assert run_in_process(tmp_path, "objective.metric=val/accuracy") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: objective.metric:")
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "outputs" / "run").exists(), "a config that never ran leaves no output folder"


# --- found after the run exists: one line, exit 2, the run FAILED with the message --------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["finetune=gradual_unfreeze", "finetune.every_n_epochs=5"], "no layer group trains within trainer.max_epochs"),
        (["finetune=milestones", "finetune.milestones=[{epoch: 4, unfreeze: all}]"], "no layer group trains"),
        (["finetune=partial", "finetune.k=7"], "finetune: finetune.k=7, but the backbone has only 3 layer groups"),
        (["data.max_train_samples=1000"], "data.max_train_samples: 1000 asked, but the training split has only 50"),
        (["data.labels_per_class=1000"], "data.labels_per_class + data.val_per_class = 1000 + "),
        (["backbone=hf", "backbone.model=/nonexistent/model"], "backbone (hf): "),
        (["finetune=lora", "finetune.target_modules=[nope]"], "finetune: "),
    ],
)
def test_errors_after_start_end_the_run_failed(
    tmp_path: Path, capsys, restore_signals, overrides: list[str], message: str
) -> None:
    assert run_in_process(tmp_path, *QUICK, *overrides) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]  # above it: MLflow's and Lightning's info lines
    assert line.startswith("Error: ") and message in line, line
    run = only_run(tmp_path)
    assert run.info.status == "FAILED" and message in run.data.tags["error"]
    assert (tmp_path / "outputs" / "run" / "error.log").read_text().startswith("Traceback")


def test_divergence_stops_the_run_failed_naming_epoch_step_and_lr(tmp_path: Path, capsys, restore_signals) -> None:
    assert run_in_process(tmp_path, *QUICK, "optim.lr=1e12") == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "training diverged" in line and "at epoch" in line and "lower optim.lr (now 1e+12" in line
    run = only_run(tmp_path)
    assert run.info.status == "FAILED" and "diverged" in run.data.tags["error"]


# --- data the run cannot learn from ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_preprocessing():
    return BACKBONES.build({"name": "minilm"}).preprocessing


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "data.train_path: .* is empty"),
        (b"sentence\tlabel\n", "data.train_path: .*no usable rows"),
        (
            b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe binary",
            "data.train_path: .* not valid utf-8: .* byte offset 0",
        ),
        (b"sentence\tlabel\ngood\t1\nfine\t1\nnice\t1\n", "needs at least 2"),
        (
            b"sentence\tlabel\n" + b"".join(f"s{i}\t{i * 0.37 % 5:.2f}\n".encode() for i in range(60)),
            "label_column 'label' looks continuous: 60 distinct numbers in 60 rows .* task=regression",
        ),
        (
            b"sentence\tlabel\na\tx\nb\ty\nc\tz\nd\tw\n",
            "label_column 'label' has as many distinct values as rows \\(4\\)",
        ),
    ],
    ids=["empty", "header_only", "binary", "one_class", "continuous", "distinct_per_row"],
)
def test_bad_data_files_are_config_errors(tmp_path: Path, minilm_preprocessing, content: bytes, message: str) -> None:
    path = tmp_path / "train.tsv"
    path.write_bytes(content)
    dm = DATA.build(
        {"name": "text_table", "train_path": str(path)},
        preprocessing=minilm_preprocessing,
        seed=0,
        task=classification(),
    )
    with pytest.raises(ConfigError, match=message):
        dm.setup("fit")


# --- collapse is flagged, not silent ---------------------------------------------------------------------------


def test_collapsed_model_is_flagged_one_class_and_flat_loss() -> None:
    strategy, module, dm = build_pieces({"name": "linear_probe"})
    with torch.no_grad():
        module.head[1].bias.copy_(torch.tensor([1e4, 0, 0, 0, 0]))  # every input lands in class 0
    module._configure_optim.keywords["cfg"].lr = 1e-12  # and nothing moves it
    health = HealthCheck(1e-12, module.task)
    bare_trainer([*strategy.callbacks(), health], max_epochs=3, limit_val_batches=None).fit(module, datamodule=dm)
    tags = health.tags()
    assert set(tags["health"].split(",")) == {"one_class", "loss_flat"}
    assert "collapsed" in tags["health.one_class"] and "never fell" in tags["health.loss_flat"]


def test_healthy_run_is_tagged_ok() -> None:
    strategy, module, dm = build_pieces({"name": "full"})
    health = HealthCheck(1e-2, module.task)
    bare_trainer([*strategy.callbacks(), health], max_epochs=3, limit_val_batches=None).fit(module, datamodule=dm)
    assert health.tags() == {"health": "ok"}


# --- signals and dead processes (real CLI processes) -----------------------------------------------------------


def cli(cwd: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "src.run", *args, "trainer.enable_progress_bar=false"]
    return subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_epoch(cwd: Path, epoch: int, max_epochs: str, timeout: float = 600) -> str:
    """The id of the run with `trainer.max_epochs=max_epochs` once its `epoch`-th validation is in MLflow."""
    deadline = time.time() + timeout
    uri = f"sqlite:///{cwd / 'mlflow.db'}"
    while time.time() < deadline:
        if (cwd / "mlflow.db").exists():
            with store_lock(uri):  # the run may be creating the store's tables right now
                client = MlflowClient(uri)
            experiment = client.get_experiment_by_name("transfer-lab")
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
            for run in runs:
                if run.data.params.get("trainer.max_epochs") != max_epochs:
                    continue
                if len(client.get_metric_history(run.info.run_id, "val/acc")) >= epoch:
                    return run.info.run_id
        time.sleep(1)
    raise TimeoutError(f"no run reached epoch {epoch}")


def test_sigterm_kills_run_with_checkpoint_and_resume_continues_it(tmp_path: Path, restore_signals) -> None:
    proc = cli(tmp_path, "trainer.max_epochs=200")
    run_id = wait_for_epoch(tmp_path, 2, "200")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("Stopped by SIGTERM; checkpoint saved at") and f"resume={run_id}" in last
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "KILLED"
    done = len(client.get_metric_history(run_id, "val/acc"))

    assert run_in_process(tmp_path, f"resume={run_id}", f"trainer.max_epochs={done + 2}") == 0
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "true"
    steps = sorted(m.step for m in client.get_metric_history(run_id, "val/acc"))
    assert steps[-1] == done + 1 and set(range(done + 2)) <= set(steps), steps
    assert len(client.search_runs([run.info.experiment_id])) == 1, "resume continues the same run"


def test_kill_9_run_is_marked_failed_by_the_next_start_and_parallel_runs_do_not_collide(
    tmp_path: Path, restore_signals
) -> None:
    victim, survivor = cli(tmp_path, "trainer.max_epochs=200"), cli(tmp_path, "trainer.max_epochs=3")
    victim_id = wait_for_epoch(tmp_path, 1, "200")
    victim.kill()
    victim.wait(30)
    _, err = survivor.communicate(timeout=300)
    assert survivor.returncode == 0, err[-2000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = {r.info.run_id: r for r in client.search_runs([client.get_experiment_by_name("transfer-lab").experiment_id])}
    assert len(runs) == 2 and len({r.data.tags["output_dir"] for r in runs.values()}) == 2
    # the survivor started before the kill: the victim is still RUNNING until the next start looks
    assert run_in_process(tmp_path, "trainer.max_epochs=1", "tracking.log_checkpoint=false") == 0
    dead = client.get_run(victim_id)
    assert dead.info.status == "FAILED" and "died without ending the run" in dead.data.tags["error"]
    assert all(r.info.status != "RUNNING" for r in client.search_runs([dead.info.experiment_id]))


def test_fit_interrupt_stops_after_the_batch_and_resumes_from_the_epoch_end(tmp_path: Path) -> None:
    """The graceful path itself: a stop request mid-epoch ends the fit after that batch; the resume point is the
    last epoch-end checkpoint, so the interrupted epoch is redone whole (with its validation)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from src.signals import STOP

    strategy, module, dm = build_pieces({"name": "full"})  # 50 training images, batch 16: 4 steps per epoch
    STOP.install()
    STOP.checkpoint = tmp_path / "last.ckpt"
    stopped_at: list[int] = []

    class SignalAtStep6(pl.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == 6 and not stopped_at:
                stopped_at.append(trainer.global_step)
                os.kill(os.getpid(), signal.SIGINT)

    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    try:
        with pytest.raises(SystemExit):
            bare_trainer(
                [*strategy.callbacks(), checkpoints, STOP, SignalAtStep6()], max_epochs=5, enable_checkpointing=True
            ).fit(module, datamodule=dm)
        assert STOP.signum == signal.SIGINT and STOP.saved == tmp_path / "last.ckpt" and stopped_at == [6]
        state = torch.load(tmp_path / "last.ckpt", weights_only=False)
        assert (state["epoch"], state["global_step"]) == (0, 4), "the end of epoch 0, not the mid-epoch state"
    finally:
        STOP.install()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
