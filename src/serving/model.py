"""A trained run as a self-contained model: backbone + head + task + preprocessing, rebuilt offline.

The task (its config and what it learned: tuned thresholds, a target's scale) travels with the weights, so the
served predictions are the run's: classes with probabilities, tags with per-tag probabilities, or numbers in the
target's original units. The same `TrainedModel` serves `mlflow.pyfunc.load_model(...).predict(df)`,
`mlflow models serve`, `src.evaluate` and `src.predict`, so a served model and an evaluated one cannot disagree.
Raw inputs are a DataFrame: the training data's text column (and text-pair column), or an `image` column of file
paths or base64-encoded images.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel
from PIL import Image, UnidentifiedImageError

from src.schema import ConfigError
from src.tasks.base import Task

SPEC_FILE = "spec.json"
WEIGHTS_FILE = "weights.pt"
IMAGE_COLUMN = "image"
BATCH_SIZE = 64


@dataclass
class InputSpec:
    """How raw inputs become a batch, mirroring the data module the run trained on."""

    modality: str  # text | image
    text_columns: list[str] = field(default_factory=list)  # joined with text_separator, as in training
    text_separator: str = " "
    text_pair_column: str | None = None
    max_length: int | None = None
    lowercase: bool = False
    image_size: int | None = None  # image: shorter side resized to this, then centre-cropped square
    channels: int = 3
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)

    @property
    def columns(self) -> list[str]:
        if self.modality == "image":
            return [IMAGE_COLUMN]
        return [*self.text_columns, *([self.text_pair_column] if self.text_pair_column else [])]


@dataclass
class ModelSpec:
    """Everything but the weights and tokenizer files: `spec.json` in the model's artifacts."""

    backbone: dict[str, Any]  # the resolved conf/backbone node the run trained with
    hf_files: bool  # the backbone is a Hugging Face model whose config + tokenizer are saved beside the weights
    feature_dim: int
    task: dict[str, Any]  # the resolved conf/task node
    names: list[str]  # classes, tags or target columns: the head's outputs
    input: InputSpec
    label_column: Any  # the training data's label column(s): what `src.evaluate` reads from a table by default
    label_separator: str | None = None  # multi-label: the character between tags in that column
    source_run_id: str | None = None

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> ModelSpec:
        data = json.loads(path.read_text())
        return cls(**{**data, "input": InputSpec(**data["input"])})


def rebuild_node(spec: ModelSpec, hf_dir: Path | None) -> dict[str, Any]:
    """The backbone config to rebuild from with `pretrained=False`: a Hugging Face backbone (`hf`, `minilm`) is
    pointed at the saved config + tokenizer folder, so loading never reaches the hub."""
    if not spec.hf_files:
        return spec.backbone
    node = {"name": "hf", "model": str(hf_dir), "pooling": spec.backbone.get("pooling", "cls")}
    if spec.input.modality == "image":
        node["image_size"] = spec.input.image_size
    return node


def decode_image(value: Any) -> Image.Image:
    """A file path, or a base64 string (optionally a `data:...;base64,` URI) of an image file."""
    text = str(value)
    if len(text) < 4096 and Path(text).expanduser().is_file():
        return Image.open(Path(text).expanduser())
    try:
        data = base64.b64decode(text.split(",", 1)[1] if text.startswith("data:") else text, validate=True)
        return Image.open(io.BytesIO(data))
    except (binascii.Error, ValueError, UnidentifiedImageError):
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise ConfigError(f"{IMAGE_COLUMN}: {shown!r} is neither an image file nor a base64-encoded image") from None


class TrainedModel:
    """Backbone + head in eval mode, with the run's preprocessing and task: raw DataFrame rows in, the task's
    prediction columns out."""

    def __init__(self, spec: ModelSpec, backbone: torch.nn.Module, head: torch.nn.Module, task: Task) -> None:
        self.spec, self.backbone, self.head, self.task = spec, backbone.eval(), head.eval(), task
        self.tokenizer = backbone.preprocessing.tokenizer

    @classmethod
    def load(cls, folder: Path) -> TrainedModel:
        """From the artifacts `src.serving.export` writes: spec.json, weights.pt and (hf) the backbone files."""
        from src.backbones import BACKBONES
        from src.module import Head
        from src.tasks import TASKS

        spec = ModelSpec.load(folder / SPEC_FILE)
        backbone = BACKBONES.build(rebuild_node(spec, folder / "backbone"), pretrained=False)
        head = Head(spec.feature_dim, len(spec.names))
        task = TASKS.build(spec.task)
        task.bind(spec.names, None)
        weights = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        backbone.load_state_dict(weights["backbone"])
        head.load_state_dict(weights["head"])
        task.load_state_dict(weights["task"])
        return cls(spec, backbone, head, task)

    def check_columns(self, frame: pd.DataFrame) -> None:
        missing = [c for c in self.spec.input.columns if c not in frame.columns]
        if missing:
            raise ConfigError(
                f"input: no column(s) {missing}; this model takes {self.spec.input.columns}, got {list(frame.columns)}"
            )

    def _text_batch(self, rows: pd.DataFrame) -> dict[str, torch.Tensor]:
        s = self.spec.input

        def texts(columns: list[str]) -> list[str]:
            """Stripped non-empty parts joined with the separator, then lowercased: as `text_table` does."""
            parts = [["" if v is None else str(v).strip() for v in rows[c]] for c in columns]
            joined = [s.text_separator.join(p for p in row if p) for row in zip(*parts, strict=True)]
            return [t.lower() for t in joined] if s.lowercase else joined

        pairs = texts([s.text_pair_column]) if s.text_pair_column else None
        encoded = self.tokenizer(
            texts(s.text_columns), pairs, truncation=True, max_length=s.max_length, padding=True, return_tensors="pt"
        )
        return dict(encoded)

    def _image_batch(self, rows: pd.DataFrame) -> dict[str, torch.Tensor]:
        from src.backbones.base import Preprocessing
        from src.data.image_folder import image_transform, to_mode
        from src.data.transforms import CenterCrop, Compose, Resize, pil_to_tensor

        s = self.spec.input
        preprocessing = Preprocessing("image", image_size=s.image_size, channels=s.channels, mean=s.mean, std=s.std)
        transform = Compose([Resize(s.image_size), CenterCrop(s.image_size), image_transform(preprocessing, False)])
        mode = "L" if s.channels == 1 else "RGB"
        pixels = []
        for value in rows[IMAGE_COLUMN]:
            with decode_image(value) as image:
                pixels.append(transform(pil_to_tensor(to_mode(image, mode))))
        return {"pixel_values": torch.stack(pixels)}

    def batches(self, frame: pd.DataFrame, batch_size: int = BATCH_SIZE) -> Iterator[dict[str, torch.Tensor]]:
        self.check_columns(frame)
        encode = self._text_batch if self.spec.input.modality == "text" else self._image_batch
        for start in range(0, len(frame), batch_size):
            yield encode(frame.iloc[start : start + batch_size])

    @torch.no_grad()
    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Raw head outputs (the task reads them: logits of classes or tags, standardised targets)."""
        return self.head(self.backbone(batch)).float()

    def outputs(self, frame: pd.DataFrame, batch_size: int = BATCH_SIZE) -> np.ndarray:
        out = [self.logits(batch).numpy() for batch in self.batches(frame, batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.spec.names)), dtype=np.float32)

    def predict_frame(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The task's columns: `label` + `prob_<class>`, `labels` (a JSON list of the chosen tags) +
        `prob_<tag>`, or `pred_<target>` in original units. Built in one go: adding columns one by one fragments
        the frame, and pandas warns at every model log and prediction once there are about a hundred outputs."""
        columns = self.task.predict(self.outputs(frame).astype(np.float64))
        return pd.DataFrame(columns)


class TransferPyfunc(PythonModel):
    """The MLflow pyfunc face of `TrainedModel`: `artifacts["model"]` is the folder `TrainedModel.load` reads."""

    def load_context(self, context: Any) -> None:
        self.classifier = TrainedModel.load(Path(context.artifacts["model"]))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        return self.classifier.predict_frame(pd.DataFrame(model_input))
