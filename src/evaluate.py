"""`python -m src.evaluate run=<run> [data=...]`: a trained run's model on labelled data, as a NEW MLflow run.

The metrics (`test/acc`, `test/macro_f1`, `test/spearman`, ... the names `trainer.test` logs for the model's task,
so both sit in the same columns of the runs table) and the task's report (confusion matrix, per-tag F1, predicted
vs true) go to a new run tagged `source_run_id=<the run>`, and are printed.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from src.schema import ConfigError
from src.serving.cli import load_classifier, main_guard, parse, read_inputs, require, tracking_client

if TYPE_CHECKING:
    import torch
    from mlflow.tracking import MlflowClient
    from omegaconf import DictConfig

    from src.serving.model import TrainedModel

USAGE = """
usage: python -m src.evaluate run=<run> [data=<file | folder | data option>] [data.<key>=<value> ...] [key=value ...]

Evaluates a run's logged model on labelled data; logs the metrics and confusion matrix as a new MLflow run tagged
source_run_id=<run>, and prints the metrics.
  data=<table file>   CSV / TSV / JSON lines with the model's input column(s) and a label column
  data=<folder>       images in <folder>/<class>/<image> (image models)
  data=<option>       a conf/data option (e.g. sst2), built with the model's preprocessing: its test split
  no data=            the run's own data config: its test split; data.<key>=<value> overrides any key

examples:
  python -m src.evaluate run=3f2a9c... data=../shared/data/sst2/test.tsv
  python -m src.evaluate run=3f2a9c... data.test_path=my/new_test.tsv
  python -m src.evaluate run=3f2a9c... data=hymenoptera data.test_dir=my/photos
  python -m src.evaluate run=outputs/2026-11-30/10-00-00-ab12cd/checkpoints/best.ckpt
"""
KEYS = {
    "run": "run id, a checkpoint file in a run's output folder, a runs:/ or models:/ URI, or a model folder",
    "data": "table file, image folder or conf/data option (default: the run's data config)",
    "data.<key>": "override a key of that data config, e.g. data.test_path=new.tsv",
    "label_column": "a table's label column (default: the training data's)",
    "checkpoint": "evaluate these weights (.ckpt) in the run's model",
    "batch_size": "inputs per forward pass (default 64)",
    "tracking.uri": "MLflow store (default sqlite:///mlflow.db in the current directory)",
    "tracking.experiment": "experiment of the new run (default: the source run's)",
}
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
# data modules that read a test file/folder
TEST_KEYS = {"text_table": "test_path", "image_folder": "test_dir", "image_manifest": "test_path"}


def _stored_config(client: MlflowClient, run_id: str | None) -> DictConfig:
    """The config the run trained with (its `config.yaml` artifact)."""
    import tempfile

    from mlflow.exceptions import MlflowException
    from omegaconf import OmegaConf

    from src.tracking.resume import CONFIG_ARTIFACT

    if run_id is None:
        raise ConfigError("data: this model names no run whose data config could be reused; give data=<file|option>")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return OmegaConf.load(client.download_artifacts(run_id, CONFIG_ARTIFACT, tmp))
    except (MlflowException, OSError):
        raise ConfigError(f"data: run {run_id} has no {CONFIG_ARTIFACT}; give data=<file|option>") from None


def _data_config(option: str | None, overrides: dict[str, str], client: MlflowClient, run_id: str | None):
    """A data config node (a conf/data option, else the run's own) with `data.<key>` overrides, and the seed."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from src.data import DATA
    from src.schema import blame

    dotlist = [f"{k}={v}" for k, v in overrides.items()]
    if option is not None:
        options = sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml"))
        if option not in options:
            raise ConfigError(f"data: {option!r} is no file, folder or data option; options: {', '.join(options)}")
        with blame("data"), initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[f"data={option}", *dotlist])
            OmegaConf.resolve(cfg)  # the group refers to the root (cache_dir: the run's cache.dir)
        node, seed = cfg.data, 0
    else:
        stored = _stored_config(client, run_id)
        node = OmegaConf.merge(stored.data, OmegaConf.from_dotlist([d[len("data.") :] for d in dotlist]))
        seed = int(stored.get("seed", 0))
    with blame("data"):
        DATA.config(node)  # validated before any data is read
    return node, seed


def _test_key(source: str, client: MlflowClient, run_id: str | None) -> str | None:
    """The key of the run's data config that takes `source` as its test split (`test_path` of a table, `test_dir`
    of an image folder), so a new file is read exactly as the run read its own: columns, label names, cleaning,
    tokenisation. None when the run's data module does not read files (digits, a hub dataset)."""
    if run_id is None:
        return None
    try:
        data = _stored_config(client, run_id).data
    except ConfigError:
        return None
    key = TEST_KEYS.get(data.get("name"))
    if key is None or data.get("hf_dataset") is not None:
        return None
    return key if Path(source).expanduser().is_dir() == (key == "test_dir") else None


def _from_config(classifier: TrainedModel, node, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    from src.data import DATA
    from src.tasks import TASKS

    task = TASKS.build(classifier.spec.task)  # the data's own copy: binding it must not touch the model's
    datamodule = DATA.build(node, preprocessing=classifier.backbone.preprocessing, seed=seed, task=task)
    datamodule.setup("test")
    if datamodule.names != classifier.spec.names:
        raise ConfigError(f"data: its outputs {datamodule.names} are not the model's {classifier.spec.names}")
    for batch in datamodule.test_dataloader():
        yield classifier.logits(batch), batch["labels"]


def _from_table(
    classifier: TrainedModel, source: str, label_column: str | None, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A raw table read as the model's task reads labels (classes, tag lists or indicator columns, numbers)."""
    import torch

    from src.data.config import label_columns
    from src.data.tables import RawTable
    from src.tasks.base import LabelFormat

    spec = classifier.spec
    column = label_column or spec.label_column
    columns = label_columns(column)
    frame = read_inputs(source, classifier, columns[0])
    if missing := [c for c in columns if c not in frame.columns]:
        raise ConfigError(
            f"data: {source} has no label column {missing[0]!r} (columns: {list(frame.columns)}); "
            "set label_column=<name>"
        )
    cells = RawTable(source, {c: list(frame[c]) for c in columns}, []).label_cells(columns)
    fmt = LabelFormat(columns, spec.names, None, spec.label_separator, "error")
    rows, targets = classifier.task.codec(cells, fmt, source).encode(cells, list(range(2, len(cells) + 2)), source)
    frame, targets = frame.iloc[rows], torch.as_tensor(targets)
    for start, batch in zip(range(0, len(frame), batch_size), classifier.batches(frame, batch_size), strict=True):
        yield classifier.logits(batch), targets[start : start + batch_size]


def evaluate(pairs: Iterator[tuple[torch.Tensor, torch.Tensor]], classifier: TrainedModel):
    """The metrics `trainer.test` logs for the model's task (same names, same code) and the task's report."""
    import torch

    outputs, targets = [], []
    for logits, labels in pairs:
        outputs.append(logits)
        targets.append(labels)
    if not outputs:
        raise ConfigError("data: no examples to evaluate")
    outputs, targets = torch.cat(outputs), torch.cat(targets)
    values = {k: float(v) for k, v in classifier.task.evaluate(outputs, targets, "test/").items()}
    return values, classifier.task.report(outputs, targets), len(targets)


def main(argv: list[str]) -> dict[str, float]:
    args = parse(argv, KEYS, USAGE, prefixes=("data.",))
    from src.config import TrackingConfig
    from src.tracking import MLflowRun, naming

    client = tracking_client(args)
    classifier, run_id = load_classifier(require(args, "run"), client, args.get("checkpoint"))
    batch_size = args.get("batch_size", "64")
    if not batch_size.isdigit() or int(batch_size) < 1:
        raise ConfigError(f"batch_size: must be a positive integer; got {batch_size!r}")
    batch_size = int(batch_size)
    source, overrides = args.get("data"), {k: v for k, v in args.items() if k.startswith("data.")}
    label_column = args.get("label_column")
    key = None
    if source is not None and Path(source).expanduser().exists():
        key = _test_key(source, client, run_id)
        if key is None and overrides:
            raise ConfigError(f"{next(iter(overrides))}: the run's data config does not read {source}; drop it")
    if key is not None:  # the run's own data module, reading `source` as its test split
        given = {f"data.{key}": str(Path(source).expanduser().resolve())}
        if label_column and key == "test_path":
            given["data.label_column"] = label_column
        node, seed = _data_config(None, {**given, **overrides}, client, run_id)
        pairs = _from_config(classifier, node, seed)
        described = " ".join([source, *(f"{k}={v}" for k, v in overrides.items())])
    elif source is not None and Path(source).expanduser().exists():
        pairs, described = _from_table(classifier, source, label_column, batch_size), source
    else:
        node, seed = _data_config(source, overrides, client, run_id)
        pairs = _from_config(classifier, node, seed)
        described = " ".join([f"data={source or '<run config>'}", *(f"{k}={v}" for k, v in overrides.items())])
    values, report, count = evaluate(pairs, classifier)

    source_run = client.get_run(run_id) if run_id else None
    experiment = args.get("tracking.experiment") or (
        client.get_experiment(source_run.info.experiment_id).name if source_run else TrackingConfig().experiment
    )
    tags = {"source_run_id": run_id} if run_id else {}
    stem = Path(source).stem if source else "test"
    name = naming.SEP.join(["eval", stem, source_run.info.run_name if source_run else "model"])
    with MLflowRun(TrackingConfig(uri=client.tracking_uri, experiment=experiment), Path.cwd(), name, tags) as run:
        run.log_params({"eval.run": args["run"], "eval.data": described, "eval.examples": str(count)})
        run.log_metrics(values)
        for artifact_name, artifact in report.items():
            (run.log_figure if artifact_name.endswith(".png") else run.log_dict)(artifact, artifact_name)
    print(f"evaluated {args['run']} on {described} ({count} examples)")
    print("  " + "  ".join(f"{k}={v:.4f}" for k, v in sorted(values.items())))
    print(f"logged as run {run.run_id} in experiment {experiment!r}" + (f", source run {run_id}" if run_id else ""))
    return values


if __name__ == "__main__":
    main_guard(main)
    sys.exit(0)
