"""Named evaluation sets at test time (`data.eval_sets`): each set is scored with the tested weights (the best
checkpoint, WiSE-FT-interpolated when asked) and logged as `test/<name>/<metric>`, the same metric names the task
logs for the test split under `test/`. The sets are the data module's `eval/<name>` splits (see
`DataModule.eval_splits`), so the feature cache serves them like any other split.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from src.adapt.selection import predict


def scores(trainer: pl.Trainer, module: pl.LightningModule, loader: Any, prefix: str) -> dict[str, torch.Tensor]:
    """The task's metrics of the module as it is now on one labelled loader, named `<prefix><metric>`."""
    outputs, targets = predict(trainer, module, loader)
    return module.task.evaluate(outputs, targets, prefix)


def tested_and_eval_sets(trainer: pl.Trainer, module: pl.LightningModule, prefix: str) -> dict[str, torch.Tensor]:
    """`<prefix><metric>` on the split tested and `<prefix><set>/<metric>` on every named evaluation set."""
    datamodule = trainer.datamodule
    out = scores(trainer, module, datamodule.test_dataloader(), prefix)
    for name, loader in datamodule.eval_dataloaders().items():
        out |= scores(trainer, module, loader, f"{prefix}{name}/")
    return out


class EvalSets(pl.Callback):
    """Logs `test/<name>/<metric>` for every named evaluation set at the end of the test pass."""

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name, loader in trainer.datamodule.eval_dataloaders().items():
            pl_module.log_dict(scores(trainer, pl_module, loader, f"test/{name}/"))
