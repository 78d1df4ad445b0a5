"""An LR range test that keeps discriminative LRs: every group's LR is scaled by the same factor.

Lightning's `Tuner.lr_find` sets one LR on all parameter groups, which erases layer decay and the head
multiplier. Here the run's own optimizer (groups, weight decay, freezing state of epoch 0) is built as for
training, and only the shared LambdaLR factor is replaced by an exponential ramp, so the swept quantity is the
base LR `optim.lr` and the group ratios hold at every step. The weights are restored afterwards.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import numpy as np
import torch
from torchmetrics import Metric

from src.data.common import source_loader
from src.optim import OptimConfig
from src.tracking.plots import plt

if TYPE_CHECKING:
    from src.tracking import MLflowRun

log = logging.getLogger(__name__)


@dataclass
class LRFindResult:
    """The swept base LR per step, the smoothed loss there, every param group's LR (ratio check), the suggestion."""

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    group_lrs: list[list[float]] = field(default_factory=list)
    suggestion: float = math.nan


def ramp(step: int, steps: int, start: float, end: float) -> float:
    """Exponential ramp from `start` (step 0) to `end` (step `steps - 1`)."""
    return start * (end / start) ** (step / (steps - 1))


def suggest(lrs: list[float], losses: list[float], method: str) -> float:
    """`steepest`: where the smoothed loss falls fastest per log-LR; `min_div_10`: a tenth of the min-loss LR."""
    if len(losses) < 2:
        return math.nan
    if method == "min_div_10":
        return lrs[int(np.argmin(losses))] / 10
    return lrs[int(np.argmin(np.gradient(np.asarray(losses), np.log(lrs))))]


class Repeat:
    """`steps` batches from a loader, re-iterated as needed, as one epoch: the whole sweep sees epoch 0's state."""

    def __init__(self, loader: Iterable, steps: int) -> None:
        self.loader, self.steps = loader, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator:
        return itertools.islice(itertools.chain.from_iterable(itertools.repeat(self.loader)), self.steps)


class LRSweep(pl.Callback):
    """Swaps the schedule factor for the ramp and records loss vs LR; stops once the loss diverges."""

    def __init__(self, cfg: OptimConfig) -> None:
        self.cfg = cfg
        self.factor = partial(
            ramp, steps=cfg.lr_find_steps, start=cfg.lr_find_min_lr / cfg.lr, end=cfg.lr_find_max_lr / cfg.lr
        )
        self.result = LRFindResult()
        self._avg = 0.0
        self._best = math.inf

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        scheduler = trainer.lr_scheduler_configs[0].scheduler
        scheduler.lr_lambdas = [self.factor] * len(scheduler.lr_lambdas)
        for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["lr"] = base * self.factor(scheduler.last_epoch)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.result.lrs.append(self.cfg.lr * self.factor(idx))
        self.result.group_lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        loss = float(outputs["loss"] if isinstance(outputs, dict) else outputs)
        beta = self.cfg.lr_find_smoothing
        self._avg = beta * self._avg + (1 - beta) * loss
        smoothed = self._avg / (1 - beta ** (idx + 1))  # bias-corrected EMA
        self.result.losses.append(smoothed)
        self._best = min(self._best, smoothed)
        if not math.isfinite(smoothed) or smoothed > self.cfg.lr_find_diverge * self._best:
            trainer.should_stop = True


# The run's trainer settings that change what a step does: the finder trains under them, so it suggests an LR for
# the run's dynamics (clipping tames the divergence the finder looks for; accumulation changes the update size).
DYNAMICS = ("accelerator", "precision", "gradient_clip_val", "gradient_clip_algorithm", "accumulate_grad_batches")


def find_lr(
    module: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    cfg: OptimConfig,
    callbacks: list[pl.Callback],
    trainer_kwargs: dict[str, Any] | None = None,
) -> LRFindResult:
    """Sweep `optim.lr` from `lr_find_min_lr` to `lr_find_max_lr` over `lr_find_steps` steps on one device.

    `callbacks` are fresh strategy callbacks (the freezing state of epoch 0 and the BN policy apply); the
    module's weights, buffers and metric states are restored and the RNG streams left untouched.
    """
    sweep = LRSweep(cfg)
    state = copy.deepcopy(module.state_dict())
    dynamics = {k: v for k, v in (trainer_kwargs or {}).items() if k in DYNAMICS and v is not None}
    trainer = pl.Trainer(
        **dynamics,
        devices=1,
        max_epochs=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[*callbacks, sweep],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with torch.random.fork_rng(devices=[]):
        trainer.fit(module, train_dataloaders=Repeat(source_loader(datamodule.train_dataloader()), cfg.lr_find_steps))
    module.load_state_dict(state)
    for metric in module.modules():
        if isinstance(metric, Metric):
            metric.reset()
    result = sweep.result
    result.suggestion = suggest(result.lrs, result.losses, cfg.lr_find_suggestion)
    return result


def apply_lr(cfg: OptimConfig, lr: float) -> None:
    """Set the base LR in place (the module's optimizer factory holds `cfg`); explicit `group_lrs` are scaled by
    the same factor, so the ratios hold there too."""
    if cfg.group_lrs:
        cfg.group_lrs = [g * lr / cfg.lr for g in cfg.group_lrs]
    cfg.lr = lr


def figure(result: LRFindResult, method: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result.lrs, result.losses)
    if math.isfinite(result.suggestion):
        ax.axvline(result.suggestion, color="red", linestyle="--", label=f"{method}: {result.suggestion:.2e}")
        ax.legend()
    ax.set(xscale="log", xlabel="base LR (optim.lr; groups keep their ratios)", ylabel="smoothed training loss")
    ax.set_title("LR range test")
    fig.tight_layout()
    return fig


def run(
    tracker: MLflowRun,
    module: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    cfg: OptimConfig,
    callbacks: list[pl.Callback],
    trainer_kwargs: dict[str, Any],
) -> LRFindResult:
    """Find, record (`lr_finder.png`, `lr_finder.json`, metric `lr_find/suggested_lr`) and, if asked, apply."""
    result = find_lr(module, datamodule, cfg, callbacks, trainer_kwargs)
    tracker.log_figure(figure(result, cfg.lr_find_suggestion), "lr_finder.png")
    tracker.log_dict({"lr": result.lrs, "loss": result.losses, "suggestion": result.suggestion}, "lr_finder.json")
    if not math.isfinite(result.suggestion):
        log.warning("lr finder: no suggestion (too few steps before the loss diverged); keeping optim.lr=%g", cfg.lr)
        return result
    tracker.log_metrics({"lr_find/suggested_lr": result.suggestion})
    log.info("lr finder: suggested optim.lr=%.3g (%s)", result.suggestion, cfg.lr_find_suggestion)
    if cfg.lr_find_apply:
        apply_lr(cfg, result.suggestion)
        tracker.log_params({"lr_find.applied_lr": str(result.suggestion)})
    return result
