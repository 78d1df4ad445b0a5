"""The linear probe as Kumar et al. (2022) fit it for LP-FT (`lp_ft`, and `linear_probe` with `probe_fit`): the
task's convex probe, fitted to convergence on frozen features -- multinomial logistic regression for classes, one
logistic regression per tag (multi-label), ridge regression on the standardised targets (regression): each is the
task's own loss on a linear map, + L2.

Features are extracted once, with the whole model in eval mode (no dropout) -- or read from the feature cache
(`src.features`), which computed them the same way -- so the probe costs one forward pass
over the training set instead of epochs of gradient steps through the frozen backbone; L-BFGS then fits the
head's final linear layer exactly. Under DDP every rank gathers all ranks' features and fits the same head.
"""

from __future__ import annotations

import math
from itertools import islice

import lightning.pytorch as pl
import torch
from torch import nn
from tqdm.auto import tqdm

from src.data.common import source_loader
from src.finetune.strategy import Strategy
from src.tasks.base import Task


def extract_features(trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features and labels of the training batches an epoch sees (this rank's shard; `limit_train_batches`
    applies), in eval mode."""
    was_training = pl_module.training
    pl_module.eval()
    features, labels = [], []
    n = trainer.num_training_batches
    total = int(n) if math.isfinite(n) else None
    batches = islice(source_loader(trainer.train_dataloader), total)  # total None: the whole loader
    quiet = trainer.progress_bar_callback is None or not trainer.is_global_zero
    with torch.no_grad():
        for batch in tqdm(batches, desc="probe: features", total=total, disable=quiet, leave=False):
            batch = trainer.strategy.batch_to_device(batch)
            features.append(pl_module.features(batch, use_frozen=True).float())  # cached features, if any
            labels.append(batch["labels"])
    pl_module.train(was_training)
    return torch.cat(features), torch.cat(labels)


def fit_probe(
    features: torch.Tensor, labels: torch.Tensor, task: Task, l2: float, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The task's loss of a linear map + l2·‖W‖² (bias unpenalised), minimised by L-BFGS (convex for every task)."""
    x = features.double()
    weight = torch.zeros(task.num_outputs, x.shape[1], dtype=x.dtype, device=x.device, requires_grad=True)
    bias = torch.zeros(task.num_outputs, dtype=x.dtype, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = task.loss(x @ weight.T + bias, labels) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


class FitLinearProbe(pl.Callback):
    """Before the first training step, sets the head's final linear layer to the fitted probe.
    A resumed fit (global step > 0) keeps the checkpoint's head."""

    def __init__(self, l2: float, max_iter: int = 500) -> None:
        self.l2 = l2
        self.max_iter = max_iter

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step > 0:
            return
        features, labels = extract_features(trainer, pl_module)
        if trainer.world_size > 1:  # equal shard sizes: the DistributedSampler pads them
            features, labels = pl_module.all_gather(features).flatten(0, 1), pl_module.all_gather(labels).flatten(0, 1)
        linear = [m for m in pl_module.head.modules() if isinstance(m, nn.Linear)][-1]
        weight, bias = fit_probe(features, labels, pl_module.task, self.l2, self.max_iter)
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)


class ProbeFitStrategy(Strategy):
    """A strategy whose head can be fitted instead of stepped (`ProbeFitConfig`): with `probe_fit`, it reads the
    training set's frozen features and fits the head by `FitLinearProbe` before the first step."""

    @property
    def extracts_features(self) -> bool:
        return self.cfg.probe_fit

    def callbacks(self) -> list[pl.Callback]:
        return super().callbacks() + ([FitLinearProbe(self.cfg.probe_l2)] if self.cfg.probe_fit else [])
