"""Log a finished run's weights (as tested) as an MLflow pyfunc model, with signature and input example."""

from __future__ import annotations

import base64
import dataclasses
import importlib.metadata
import io
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import Model, ModelSignature
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.types import ColSpec, Schema
from omegaconf import DictConfig, OmegaConf
from PIL import Image

import src
from src.backbones.hf import HFBackbone
from src.cache import fingerprint
from src.data.common import DataModule
from src.data.tables import read_table
from src.module import TransferModule
from src.serving.model import (
    IMAGE_COLUMN,
    SPEC_FILE,
    WEIGHTS_FILE,
    InputSpec,
    ModelSpec,
    TransferPyfunc,
)
from src.tasks.base import Task

log = logging.getLogger(__name__)
# MLflow warns that a Python object is pickled: ours pickles by reference to `src.serving.model`, shipped with the
# model as code, so there is nothing for a user to act on.
logging.getLogger("mlflow.pyfunc").addFilter(lambda r: "serialized using CloudPickle" not in r.getMessage())

MODEL_NAME = "model"  # runs:/<run id>/model
N_EXAMPLES = 2
# Model structures (spec + signature) whose input example MLflow already served in this process: serving it again
# for each job of a grid or sweep rebuilds the same model for the same answer (~0.5 s a job on a 2-core CPU).
_SERVED: set[str] = set()


class _PyfuncFlavor:
    """`mlflow.pyfunc` as `Model.log`'s flavor, minus the `validate_serving_input` switch that `Model.log` reads
    from the flavor's keyword arguments and `mlflow.pyfunc.save_model` rejects. The weights are written once,
    into the saved model's artifact folder: passed as an artifact, MLflow would copy them into a staging folder
    before logging (MiniLM: 90 MB written three times instead of twice)."""

    __name__ = "mlflow.pyfunc"

    def __init__(self, module: TransferModule) -> None:
        self.module = module

    def save_model(self, validate_serving_input: bool = True, **kwargs: Any) -> None:
        mlflow.pyfunc.save_model(**kwargs)
        model: Model = kwargs["mlflow_model"]
        artifacts = model.flavors[mlflow.pyfunc.FLAVOR_NAME]["artifacts"]
        weights = Path(kwargs["path"], artifacts["model"]["path"], WEIGHTS_FILE)
        write_weights(weights, self.module)
        model.model_size_bytes = (model.model_size_bytes or 0) + weights.stat().st_size
        model.save(Path(kwargs["path"], MLMODEL_FILE_NAME))


def input_spec(datamodule: DataModule) -> InputSpec:
    """The raw-input contract of the data module the run trained on (text columns, or the image transform)."""
    p = datamodule.preprocessing
    if p.modality == "text":
        c = datamodule.cfg
        return InputSpec("text", c.text_columns(), c.text_separator, c.text_pair_column, c.max_length, c.lowercase)
    size = getattr(datamodule, "image_size", None) or p.image_size
    return InputSpec("image", image_size=size, channels=p.channels, mean=list(p.mean), std=list(p.std))


def _png_base64(pixels: torch.Tensor) -> str:
    """A (C, H, W) image in [0, 1] as a base64 PNG (what a client would send for an in-memory image)."""
    array = (pixels.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def examples(datamodule: DataModule, spec: InputSpec) -> pd.DataFrame | None:
    """A few raw validation inputs: texts from the table, or images (files or in-memory) as base64."""
    if spec.modality == "text":
        c = datamodule.cfg
        key = "val_path" if c.val_path else "train_path"
        if getattr(c, key) is None:  # a Hugging Face dataset: the signature alone documents the input
            return None
        header = c.header if c.header is not None else c.column_names is None
        raw = read_table(
            key, getattr(c, key), c.format, header=header, column_names=c.column_names, encoding=c.encoding
        )
        return pd.DataFrame({col: [str(v) for v in raw.column(col)[:N_EXAMPLES]] for col in spec.columns})
    dataset = datamodule.val_dataloader().dataset
    if hasattr(dataset, "files"):
        images = [base64.b64encode(Path(f).read_bytes()).decode() for f in dataset.files[:N_EXAMPLES]]
    else:
        images = [_png_base64(dataset.images[i]) for i in range(min(N_EXAMPLES, len(dataset)))]
    return pd.DataFrame({IMAGE_COLUMN: images})


def signature(spec: ModelSpec, task: Task) -> ModelSignature:
    inputs = Schema([ColSpec("string", c) for c in spec.input.columns])
    outputs = Schema([ColSpec(kind, name) for name, kind in task.prediction_columns()])
    return ModelSignature(inputs, outputs)


def write_weights(path: Path, module: TransferModule) -> None:
    weights = {
        "backbone": module.backbone.state_dict(),
        "head": module.head.state_dict(),
        "task": module.task.state_dict(),  # what the task learned: tuned thresholds, the target's scale
    }
    torch.save(weights, path)


def write_artifacts(folder: Path, spec: ModelSpec, module: TransferModule) -> None:
    """spec.json and, for a Hugging Face backbone, its config + tokenizer under backbone/ (weights.pt: the flavor
    writes it, see `_PyfuncFlavor`)."""
    spec.save(folder / SPEC_FILE)
    backbone = module.backbone
    if isinstance(backbone, HFBackbone):
        backbone.model.config.save_pretrained(folder / "backbone")
        if backbone.preprocessing.tokenizer is not None:
            backbone.preprocessing.tokenizer.save_pretrained(folder / "backbone")


def requirements() -> list[str]:
    """The project's own dependencies (skips MLflow's slow requirement inference, which loads the model)."""
    try:
        return [r for r in importlib.metadata.requires("transfer-lab") or [] if "extra ==" not in r]
    except importlib.metadata.PackageNotFoundError:
        return [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}"]


def log_model(
    tracker: Any,
    raw: DictConfig,
    module: TransferModule,
    datamodule: DataModule,
    register_as: str | None = None,
) -> str:
    """Log the module's current weights (call after test: best checkpoint, merged adapters, WiSE-FT) as the run's
    pyfunc model `model`; register it under `register_as` if given. Returns the model URI."""
    start = time.perf_counter()
    spec = ModelSpec(
        backbone=OmegaConf.to_container(raw.backbone, resolve=True),
        hf_files=isinstance(module.backbone, HFBackbone),
        feature_dim=module.backbone.feature_dim,
        task=OmegaConf.to_container(raw.task, resolve=True),
        names=list(datamodule.names),
        input=input_spec(datamodule),
        label_column=getattr(datamodule.cfg, "label_column", "label"),
        label_separator=getattr(datamodule.cfg, "label_separator", None),
        source_run_id=tracker.run_id,
    )
    model_signature = signature(spec, module.task)
    structure = fingerprint(dataclasses.asdict(spec) | {"source_run_id": None}, model_signature.to_dict())
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracker.uri)
    try:
        # Created here, in the run's experiment: without an active run MLflow would file it under "Default".
        logged = mlflow.initialize_logged_model(MODEL_NAME, tracker.run_id, experiment_id=tracker.experiment_id)
        with tempfile.TemporaryDirectory() as tmp:
            write_artifacts(Path(tmp), spec, module)
            info = Model.log(
                None,  # artifact_path: deprecated in MLflow 3 in favour of name
                name=MODEL_NAME,
                model_id=logged.model_id,
                flavor=_PyfuncFlavor(module),
                validate_serving_input=structure not in _SERVED,
                run_id=tracker.run_id,
                python_model=TransferPyfunc(),
                artifacts={"model": tmp},
                code_paths=[str(Path(src.__file__).parent)],
                signature=model_signature,
                input_example=examples(datamodule, spec.input),
                pip_requirements=requirements(),
                registered_model_name=register_as,
            )
        _SERVED.add(structure)
    finally:
        mlflow.set_tracking_uri(previous)
    log.info("logged model %s in %.1fs", f"runs:/{tracker.run_id}/{MODEL_NAME}", time.perf_counter() - start)
    return info.model_uri
