"""A run's logged model used as a user would: `mlflow.pyfunc.load_model`, `src.evaluate`, `src.predict`, the Model
Registry and `mlflow models serve`; tiny real runs (digits + small CNN, MiniLM on a small table)."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from src import evaluate, predict
from src.backbones.base import Preprocessing
from src.config import Objective, SecondaryObjective
from src.data import DATA
from src.schema import ConfigError
from src.serving.export import _png_base64
from src.serving.model import TrainedModel
from src.sweep.trial import JobTrial
from tests.conftest import REPO, classification, shared
from tests.test_failures import run_in_process
from tests.test_text_run import write_table

REGISTERED = "digits-classifier"


def store(cwd: Path) -> str:
    return f"sqlite:///{cwd / 'mlflow.db'}"


def finished_run(cwd: Path):
    """The training run (not the evaluation runs, nor runs made by the tests)."""
    client = MlflowClient(store(cwd))
    runs = client.search_runs([client.get_experiment_by_name("transfer-lab").experiment_id])
    (run,) = [r for r in runs if "source_run_id" not in r.data.tags and "test/acc" in r.data.metrics]
    return run


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One epoch of the default digits transfer, its model registered; the test split written as PNG folders."""
    cwd = tmp_path_factory.mktemp("digits")
    overrides = ["trainer.max_epochs=1", "trainer.enable_progress_bar=false", f"tracking.register_model={REGISTERED}"]
    assert run_in_process(cwd, *overrides) == 0
    run = finished_run(cwd)
    digits = DATA.build(
        {"name": "digits"},
        preprocessing=Preprocessing("image", image_size=8, channels=1, mean=(0.5,), std=(0.5,)),
        seed=0,
        task=classification(),
    )
    digits.setup("test")
    test = digits.test_dataloader().dataset
    for i, (image, label) in enumerate(zip(test.images, test.labels, strict=True)):
        folder = cwd / "test_images" / digits.names[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.png").write_bytes(base64.b64decode(_png_base64(image)))
    return cwd, run.info.run_id


def in_dir(cwd: Path, fn, *args):
    old = Path.cwd()
    os.chdir(cwd)
    try:
        return fn(*args)
    finally:
        os.chdir(old)


def test_logged_model_loads_and_predicts_image_paths(digits_run: tuple[Path, str]) -> None:
    cwd, run_id = digits_run
    mlflow.set_tracking_uri(store(cwd))
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    schema = model.metadata.get_output_schema().input_names()
    assert schema == ["label", *(f"prob_{d}" for d in "56789")]
    assert model.metadata.get_input_schema().input_names() == ["image"]
    paths = sorted((cwd / "test_images").glob("*/*.png"))
    frame = pd.DataFrame({"image": [str(p) for p in paths]})
    out = model.predict(frame)
    assert list(out.columns) == schema and len(out) == len(paths)
    probs = out[schema[1:]].to_numpy()
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)
    assert (out["label"] == [f"prob_{d}" for d in probs.argmax(1) + 5]).sum() == 0  # labels are class names
    truth = np.array([p.parent.name for p in paths])
    accuracy = float((out["label"].to_numpy() == truth).mean())
    assert abs(accuracy - finished_run(cwd).data.metrics["test/acc"]) < 0.01  # PNGs quantise the 8x8 digits
    # The input example is self-contained (base64 PNGs) and predicts like a path does.
    assert list(model.predict(model.input_example).columns) == schema


def test_evaluate_on_the_runs_test_split_matches_trainer_test(digits_run: tuple[Path, str], capsys) -> None:
    cwd, run_id = digits_run
    values = in_dir(cwd, evaluate.main, [f"run={run_id}", f"tracking.uri={store(cwd)}"])
    assert values["test/acc"] == pytest.approx(finished_run(cwd).data.metrics["test/acc"], abs=1e-6)
    assert values["test/loss"] == pytest.approx(finished_run(cwd).data.metrics["test/loss"], rel=1e-4)
    client = MlflowClient(store(cwd))
    experiment = client.get_experiment_by_name("transfer-lab").experiment_id
    (new,) = client.search_runs([experiment], f"tags.source_run_id = '{run_id}'")
    assert new.info.status == "FINISHED" and new.data.metrics["test/acc"] == pytest.approx(values["test/acc"])
    assert "confusion_matrix.png" in {a.path for a in client.list_artifacts(new.info.run_id)}
    printed = capsys.readouterr().out
    assert f"test/acc={values['test/acc']:.4f}" in printed and new.info.run_id in printed
    # A checkpoint in the run's output folder: that run's model with the checkpoint's weights (here the same ones).
    checkpoint = cwd / "outputs" / "run" / "checkpoints" / "best.ckpt"
    again = in_dir(cwd, evaluate.main, [f"run={checkpoint}", f"tracking.uri={store(cwd)}"])
    assert again["test/acc"] == pytest.approx(values["test/acc"], abs=1e-6)


def test_evaluate_on_an_image_folder_and_predict_from_the_registry(digits_run: tuple[Path, str]) -> None:
    cwd, run_id = digits_run
    values = in_dir(cwd, evaluate.main, [f"run={run_id}", "data=test_images", f"tracking.uri={store(cwd)}"])
    assert abs(values["test/acc"] - finished_run(cwd).data.metrics["test/acc"]) < 0.01
    loose = cwd / "loose"
    loose.mkdir()
    for path in sorted((cwd / "test_images").glob("*/*.png"))[:5]:
        (loose / path.name).write_bytes(path.read_bytes())
    output = in_dir(
        cwd,
        predict.main,
        [f"run=models:/{REGISTERED}/1", "input=loose", "output=out/p.csv", f"tracking.uri={store(cwd)}"],
    )
    table = pd.read_csv(cwd / output)
    assert list(table.columns) == ["image", "label", *(f"prob_{d}" for d in "56789")] and len(table) == 5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run=0123456789abcdef"], "run: no run '0123456789abcdef'"),
        (["run=RUN", "data=bad_labels.csv"], "outside label_names"),
        (["run=RUN", "data=no_image.csv"], "input: no column(s) ['image']"),
        (["run=RUN", "data.target_classes=[5,6]"], "data: its outputs ['5', '6'] are not the model's"),
        (["run=EMPTY"], "no loadable model at runs:/"),
        (["run=RUN", "bogus=1"], "bogus: unknown argument"),
    ],
)
def test_bad_input_is_one_line_exit_2(digits_run: tuple[Path, str], args: list[str], message: str, capsys) -> None:
    cwd, run_id = digits_run
    (cwd / "bad_labels.csv").write_text(f"image,label\n{next((cwd / 'test_images').glob('*/*.png'))},cat\n")
    (cwd / "no_image.csv").write_text("text,label\nhello,5\n")
    client = MlflowClient(store(cwd))
    empty = client.create_run(client.get_experiment_by_name("transfer-lab").experiment_id).info.run_id
    args = [a.replace("RUN", run_id).replace("EMPTY", empty) for a in args]
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        in_dir(cwd, evaluate.main, [*args, f"tracking.uri={store(cwd)}"])
    client.delete_run(empty)


def test_cli_bad_input_prints_one_line_and_exits_2(digits_run: tuple[Path, str]) -> None:
    cwd, _ = digits_run
    for module in ("src.evaluate", "src.predict"):
        argv = [sys.executable, "-m", module, "run=0123456789abcdef", "input=x.csv", "output=y.csv"]
        if module == "src.evaluate":
            argv = argv[:4]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.run([*argv, f"tracking.uri={store(cwd)}"], cwd=cwd, capture_output=True, text=True, env=env)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr == "Error: run: no run '0123456789abcdef' in " + store(cwd) + (" (set tracking.uri=...)\n")


def test_minilm_model_predicts_raw_sentences_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_table(tmp_path / "train.csv", 4)
    write_table(tmp_path / "dev.csv", 1)
    overrides = [
        "experiment=sst2_minilm",
        f"data.train_path={tmp_path / 'train.csv'}",
        f"data.val_path={tmp_path / 'dev.csv'}",
        "data.test_path=null",
        "data.text_column=text",
        "data.label_column=sentiment",
        "data.batch_size=8",
        "data.max_train_samples=null",
        "+trainer.limit_train_batches=2",
        "trainer.enable_progress_bar=false",
        "tracking.log_checkpoint=false",
    ]
    assert run_in_process(tmp_path, *overrides) == 0
    run = finished_run(tmp_path)
    mlflow.set_tracking_uri(store(tmp_path))
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    files = {p.name for p in Path(mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/model")).rglob("*")}
    assert {"tokenizer.json", "config.json", "weights.pt", "spec.json"} <= files  # rebuilt offline from these
    sentences = pd.DataFrame({"text": ["a wonderful, moving film", "boring and far too long"]})
    out = model.predict(sentences)
    assert list(out.columns) == ["label", "prob_neg", "prob_pos"] and set(out["label"]) <= {"neg", "pos"}
    # The served preprocessing is the training one: the dev table through the model gives trainer.test's numbers.
    values = in_dir(tmp_path, evaluate.main, [f"run={run.info.run_id}", "data=dev.csv", "label_column=sentiment"])
    assert values["test/acc"] == pytest.approx(run.data.metrics["test/acc"], abs=1e-6)
    assert values["test/loss"] == pytest.approx(run.data.metrics["test/loss"], rel=1e-3)
    classifier = model.unwrap_python_model().classifier
    assert isinstance(classifier, TrainedModel) and classifier.spec.backbone["name"] == "minilm"


@pytest.mark.slow
def test_evaluate_on_the_sst2_test_file_matches_trainer_test(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The acceptance check: MiniLM on 512 SST-2 sentences, then `src.evaluate` on the labelled test file."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sst2 = shared("sst2")
    paths = [f"data.{k}_path={sst2 / f}" for k, f in (("train", "train.tsv"), ("val", "dev.tsv"), ("test", "test.tsv"))]
    overrides = ["experiment=sst2_minilm", *paths, "data.max_train_samples=512", "trainer.enable_progress_bar=false"]
    assert run_in_process(tmp_path, *overrides) == 0
    run = finished_run(tmp_path)
    values = in_dir(tmp_path, evaluate.main, [f"run={run.info.run_id}", f"data={sst2 / 'test.tsv'}"])
    assert values["test/acc"] == pytest.approx(run.data.metrics["test/acc"], abs=1e-6)  # 1 sentence = 5.5e-4
    assert values["test/auroc"] == pytest.approx(run.data.metrics["test/auroc"], abs=1e-6)


def test_a_sweep_trial_keeps_its_model_only_while_it_is_the_best_so_far() -> None:
    single = JobTrial(None, Objective())
    assert single.keeps_model(0.1), "outside sweeps every run keeps its model"
    study = optuna.create_study(direction="maximize")
    for value in (0.8, 0.9):
        study.add_trial(optuna.trial.create_trial(value=value))
    single.study = study
    assert [single.keeps_model(v) for v in (0.85, 0.9, 0.95)] == [False, True, True]
    pareto = JobTrial(None, Objective(secondary=[SecondaryObjective("trainable_params")]))  # max acc, min params
    pareto.study = optuna.create_study(directions=["maximize", "minimize"])
    pareto.study.add_trial(optuna.trial.create_trial(values=[0.9, 100]))
    assert [pareto.keeps_model(v) for v in ([0.85, 50], [0.85, 200], [0.95, 200])] == [True, False, True]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_answers_invocations(digits_run: tuple[Path, str]) -> None:
    cwd, run_id = digits_run
    port = free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen(
        [str(mlflow_cli), "models", "serve", "-m", f"runs:/{run_id}/model", "--env-manager", "local"]
        + ["-h", "127.0.0.1", "-p", str(port)],
        cwd=cwd,
        # MLflow starts `uvicorn` from PATH: the venv's bin, as when the venv is activated.
        env={
            **os.environ,
            "MLFLOW_TRACKING_URI": store(cwd),
            "PYTHONPATH": str(REPO),
            "PATH": f"{mlflow_cli.parent}{os.pathsep}{os.environ['PATH']}",
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, server.stderr.read().decode()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "server did not answer /ping within 300 s"
                time.sleep(1)
        paths = sorted((cwd / "test_images").glob("*/*.png"))[:2]
        rows = [[base64.b64encode(p.read_bytes()).decode()] for p in paths]
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
        )
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
        predictions = answer["predictions"]
        assert len(predictions) == 2
        assert all(
            p["label"] in list("56789") and abs(sum(p[f"prob_{d}"] for d in "56789") - 1) < 1e-5 for p in predictions
        )
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


def test_predictions_for_many_classes_build_one_unfragmented_frame() -> None:
    """With hundreds of classes, adding a column per class made pandas warn at every model log and prediction."""
    import warnings

    names = [f"c{i}" for i in range(300)]
    model = TrainedModel.__new__(TrainedModel)
    model.task = classification()
    model.task.bind(names, None)
    logits = np.random.default_rng(0).normal(size=(4, len(names)))
    model.outputs = lambda frame: logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = model.predict_frame(pd.DataFrame({"image": ["x"] * 4}))
    assert list(out.columns) == ["label", *(f"prob_{n}" for n in names)]
    assert list(out["label"]) == [names[i] for i in logits.argmax(1)]


def test_a_linear_probe_checkpoint_without_its_frozen_backbone_evaluates_and_initialises(tmp_path: Path) -> None:
    """A linear probe's Lightning checkpoint holds its head only (`omitted_state` lists the backbone): `src.evaluate`
    on that file, and `finetune.init_from=<file>`, take the backbone the run started from."""
    assert run_in_process(tmp_path, "finetune=linear_probe", "trainer.max_epochs=1") == 0
    checkpoint = tmp_path / "outputs" / "run" / "checkpoints" / "best.ckpt"
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["omitted_state"] and not any(k.startswith("backbone.") for k in saved["state_dict"])
    run = finished_run(tmp_path)
    again = in_dir(tmp_path, evaluate.main, [f"run={checkpoint}", f"tracking.uri={store(tmp_path)}"])
    assert again["test/acc"] == pytest.approx(run.data.metrics["test/acc"], abs=1e-6)
    assert run_in_process(tmp_path / "init", f"finetune.init_from={checkpoint}", "trainer.max_epochs=1") == 0
