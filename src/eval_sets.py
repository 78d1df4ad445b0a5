"""Named evaluation sets at test time (`data.eval_sets`): each set is scored with the tested weights (the best
checkpoint, WiSE-FT-interpolated when asked) and logged as `test/<name>/<metric>`, the same metric names the task
logs for the test split under `test/`. With `data.eval_sets_every_val` also at each validation, as
`eval/<name>/<metric>`: a curve to watch, never a checkpoint monitor (`objective.metric` must be `val/*`), since
choosing epochs on a set measured as held-out would overstate its result. The sets are the data module's
`eval/<name>` splits (see `DataModule.eval_splits`), so the feature cache serves them like any other split.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from src.adapt.selection import predict


def scores(trainer: pl.Trainer, module: pl.LightningModule, loader: Any, prefix: str) -> dict[str, torch.Tensor]:
    """The task's metrics of the module as it is now on one labelled loader, named `<prefix><metric>`. On a forked
    RNG: iterating a loader draws a seed from the global stream, and scoring mid-training must leave the run's
    shuffling and dropout as they would be without these sets."""
    with torch.random.fork_rng(devices=[]):
        outputs, targets = predict(trainer, module, loader)
    return module.task.evaluate(outputs, targets, prefix)


def eval_set_scores(trainer: pl.Trainer, module: pl.LightningModule, prefix: str) -> dict[str, torch.Tensor]:
    """`<prefix><set>/<metric>` on every named evaluation set."""
    out: dict[str, torch.Tensor] = {}
    for name, loader in trainer.datamodule.eval_dataloaders().items():
        out |= scores(trainer, module, loader, f"{prefix}{name}/")
    return out


def tested_and_eval_sets(trainer: pl.Trainer, module: pl.LightningModule, prefix: str) -> dict[str, torch.Tensor]:
    """`<prefix><metric>` on the split tested and `<prefix><set>/<metric>` on every named evaluation set."""
    tested = scores(trainer, module, trainer.datamodule.test_dataloader(), prefix)
    return tested | eval_set_scores(trainer, module, prefix)


class EvalSets(pl.Callback):
    """Logs `test/<name>/<metric>` for every named evaluation set at the end of the test pass, and with
    `every_val` `eval/<name>/<metric>` at the end of each validation."""

    def __init__(self, every_val: bool = False) -> None:
        self.every_val = every_val

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_val and not trainer.sanity_checking:
            pl_module.log_dict(eval_set_scores(trainer, pl_module, "eval/"))

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.log_dict(eval_set_scores(trainer, pl_module, "test/"))
