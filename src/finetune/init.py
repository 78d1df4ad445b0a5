"""Start a backbone from an earlier run's best checkpoint (a file path or an MLflow run id)."""

from __future__ import annotations

from pathlib import Path

import torch
from mlflow.tracking import MlflowClient
from torch import nn

from src.module import OMITTED_STATE, load_part

CHECKPOINT_ARTIFACT = "checkpoints/best.ckpt"


def resolve_checkpoint(source: str, client: MlflowClient) -> Path:
    """A local file, or the run's logged best checkpoint downloaded from MLflow."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    try:
        return Path(client.download_artifacts(source, CHECKPOINT_ARTIFACT))
    except Exception as e:
        raise FileNotFoundError(
            f"finetune.init_from={source!r} is neither a checkpoint file nor an MLflow run id with a "
            f"'{CHECKPOINT_ARTIFACT}' artifact in {client.tracking_uri} ({e})"
        ) from None


def backbone_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The backbone's weights from a Lightning/our checkpoint (keys under `backbone.`)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    prefix = "backbone."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def load_backbone(backbone: nn.Module, source: str, client: MlflowClient) -> None:
    """The checkpoint's backbone weights; those a Lightning checkpoint left out (frozen all its run) stay the
    pretrained ones this backbone was built with."""
    checkpoint = torch.load(resolve_checkpoint(source, client), map_location="cpu", weights_only=True)
    if not any(k.startswith("backbone.") for k in [*checkpoint["state_dict"], *checkpoint.get(OMITTED_STATE, [])]):
        raise ValueError(f"finetune.init_from={source!r}: the checkpoint holds no 'backbone.*' weights")
    load_part(backbone, checkpoint, "backbone")
