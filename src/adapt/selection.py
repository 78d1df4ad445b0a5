"""Target-domain evaluation and model selection without target labels.

Each validation also scores the model on the target domain: with the target test labels (`target/acc`, ...:
evaluation only, never a checkpoint monitor, since `objective.metric` must be a `val/*` metric), and with two
label-free scores on the unlabelled target training images, higher = better, which `objective.metric` may
monitor to pick the checkpoint:

- `val/target_im`: information maximisation, H(mean prediction) - mean H(prediction) (confident and diverse);
- `val/target_snd`: soft neighbourhood density (Saito et al. 2021), the entropy of each sample's softmax
  similarity to its neighbours in prediction space (predictions that form dense clusters score high).

At the end of fit it reports, side by side, the target accuracy at the epoch each criterion picks, the oracle
(best target accuracy: needs target labels) included, because label-free selection is known to be unreliable
(Musgrave et al. 2021).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import MLFlowLogger
from torch.nn import functional as F

from src.adapt.config import CRITERIA
from src.adapt.methods import entropy

log = logging.getLogger(__name__)

SND_TEMPERATURE = 0.05
SND_MAX_SAMPLES = 2000  # the similarity matrix is N x N; larger target sets are scored on a seeded subset


def information_maximization(probs: torch.Tensor) -> torch.Tensor:
    return entropy(probs.mean(0)) - entropy(probs).mean()


def soft_neighborhood_density(probs: torch.Tensor, temperature: float = SND_TEMPERATURE) -> torch.Tensor:
    if len(probs) > SND_MAX_SAMPLES:
        probs = probs[torch.randperm(len(probs), generator=torch.Generator().manual_seed(0))[:SND_MAX_SAMPLES]]
    x = F.normalize(probs, dim=1)
    similarity = x @ x.T / temperature
    similarity.fill_diagonal_(float("-inf"))  # a sample is not its own neighbour
    return entropy(similarity.softmax(1)).mean()


@torch.no_grad()
def predict(trainer: pl.Trainer, module: pl.LightningModule, loader: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits over a loader (the module in its current mode) and the labels when the batches carry them."""
    logits, labels = [], []
    for batch in loader:
        batch = trainer.strategy.batch_to_device(batch)
        logits.append(module(batch).float())
        if "labels" in batch:
            labels.append(batch["labels"])
    return torch.cat(logits), torch.cat(labels) if labels else None


class TargetEvaluation(pl.Callback):
    """Logs the target metrics and label-free scores at every validation, `test/target_*` at test, and the
    selection report at the end of fit (metrics `select/<criterion>/{epoch,target_acc}` + `model_selection.json`)."""

    def __init__(self, datamodule: Any, monitor: str, maximize: bool = True) -> None:
        self.datamodule, self.monitor, self.maximize = datamodule, monitor, maximize
        self.history: list[dict[str, float]] = []
        self.report: dict[str, dict[str, float]] = {}

    def _labelled(self, trainer: pl.Trainer, module: pl.LightningModule, prefix: str) -> dict[str, torch.Tensor]:
        loaders = self.datamodule.target_dataloaders()
        if "test" not in loaders:
            return {}
        logits, labels = predict(trainer, module, loaders["test"])
        return module.task.evaluate(logits, labels, prefix)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        logits, _ = predict(trainer, pl_module, self.datamodule.target_dataloaders()["unlabelled"])
        probs = logits.softmax(-1)
        scores = {
            "val/target_im": information_maximization(probs),
            "val/target_snd": soft_neighborhood_density(probs),
            "target/entropy": entropy(probs).mean(),
        }
        pl_module.log_dict({**scores, **self._labelled(trainer, pl_module, "target/")})

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "target/"))}
        self.history.append({"epoch": trainer.current_epoch, **metrics})

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.log_dict(self._labelled(trainer, pl_module, "test/target_"))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.report = selection_report(self.history, self.monitor, self.maximize)
        if not self.report:
            return
        flat = {f"select/{name}/{key}": value for name, row in self.report.items() for key, value in row.items()}
        for logger in trainer.loggers:
            logger.log_metrics(flat, step=0)
            if isinstance(logger, MLFlowLogger) and trainer.is_global_zero:
                logger.experiment.log_dict(logger.run_id, self.report, "model_selection.json")
        log.info("model selection on the target domain:\n%s", json.dumps(self.report, indent=1))


def selection_report(
    history: list[dict[str, float]], monitor: str, maximize: bool = True
) -> dict[str, dict[str, float]]:
    """For each criterion, the checkpoint's `monitor` and the last epoch: the (first) epoch it picks, and the target
    accuracy at that epoch when target labels exist."""
    out: dict[str, dict[str, float]] = {}
    criteria = {name: (metric, 1.0) for name, metric in CRITERIA.items()}
    criteria |= {"checkpoint": (monitor, 1.0 if maximize else -1.0), "last": ("epoch", 1.0)}
    for name, (metric, sign) in criteria.items():
        rows = [h for h in history if metric in h]
        if not rows:
            continue
        row = max(rows, key=lambda h: sign * h[metric])  # max keeps the first of equal values, as checkpoints do
        out[name] = {"epoch": row["epoch"], **({"target_acc": row["target/acc"]} if "target/acc" in row else {})}
    return out
