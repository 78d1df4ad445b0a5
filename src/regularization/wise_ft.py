"""WiSE-FT (Wortsman et al. 2022): evaluate (1 - alpha) * pretrained + alpha * fine-tuned backbone weights.

With a list of alphas (`regularization.wise_ft_alpha=[0,0.5,1]`) one run traces the curve: every alpha is scored
from the one fine-tuned checkpoint on the split tested and on every named evaluation set, logged as
`test/wise_ft/<alpha>/<metric>` and `test/wise_ft/<alpha>/<set>/<metric>`, with a figure of the ID-vs-shift curve
(`wise_ft_curve.png`) and its numbers (`wise_ft_curve.json`). The test pass itself, its plain `test/*` metrics and
the logged model, then use the LAST alpha listed, as a single alpha does; that alpha's curve point is the test
pass's own numbers (each alpha is scored once).
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.loggers import MLFlowLogger

from src.eval_sets import tested_and_eval_sets
from src.regularization.config import WISE_FT
from src.regularization.reference import PretrainedReference
from src.tracking.plots import wise_ft_figure

CURVE_FIGURE = "wise_ft_curve.png"
CURVE_TABLE = "wise_ft_curve.json"


def alpha_name(alpha: float) -> str:
    """An alpha as metric names write it: `0.25`, `1.0`."""
    return str(float(alpha))


def _prefix(alpha: float) -> str:
    return f"test/{WISE_FT}/{alpha_name(alpha)}/"


class WiseFT(pl.Callback):
    """Interpolates the backbone (the head is new, it has no pretrained weights) when testing starts, i.e. after
    the best checkpoint is loaded; the logged checkpoint then holds the interpolated weights that were tested.
    With `curve`, first scores every alpha in `alphas` but the last (see the module docstring); the last one is
    kept, and its curve point is the test pass's own metrics, renamed when testing ends (not scored twice).
    """

    def __init__(self, reference: PretrainedReference, alphas: list[float], curve: bool = False) -> None:
        self.reference, self.alphas, self.curve = reference, alphas, curve
        self.points: dict[str, dict[str, float]] = {}

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        backbone = pl_module.backbone
        if self.curve:
            fine_tuned = PretrainedReference(backbone)  # a snapshot; interpolating to alpha 0 restores it exactly
            self.points = {}
            for alpha in self.alphas[:-1]:
                self.reference.interpolate(backbone, alpha)
                metrics = tested_and_eval_sets(trainer, pl_module, _prefix(alpha))
                pl_module.log_dict(metrics)
                self.points[alpha_name(alpha)] = {k: float(v) for k, v in metrics.items()}
                fine_tuned.interpolate(backbone, 0.0)
        self.reference.interpolate(backbone, self.alphas[-1])

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The last alpha's point: the test split's `test/<metric>` and every set's `test/<set>/<metric>` (the
        test pass and the eval-set callback scored the weights it left) as `test/wise_ft/<alpha>/...`. Logged
        through the loggers: Lightning's `log` is closed once testing has ended."""
        if not self.curve:
            return
        own, prefix = f"test/{WISE_FT}/", _prefix(self.alphas[-1])
        last = {
            prefix + key.removeprefix("test/"): float(value)
            for key, value in trainer.callback_metrics.items()
            if key.startswith("test/") and not key.startswith(own)
        }
        for logger in trainer.loggers:
            logger.log_metrics({**last, "epoch": float(trainer.current_epoch)}, step=trainer.global_step)
        self._log_curve(trainer, {**self.points, alpha_name(self.alphas[-1]): last})

    def _log_curve(self, trainer: pl.Trainer, points: dict[str, dict[str, float]]) -> None:
        """The ID-vs-shift figure for the objective's metric (the checkpoint's monitor, `val/acc` -> `acc`) and
        every metric of every alpha as a table, on the MLflow run."""
        monitor = trainer.checkpoint_callback.monitor if trainer.checkpoint_callback else None
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger) and trainer.is_global_zero:
                logger.experiment.log_dict(logger.run_id, points, CURVE_TABLE)
                if monitor is not None:
                    sets = list(trainer.datamodule.cfg.eval_sets)
                    figure = wise_ft_figure(points, monitor.removeprefix("val/"), sets)
                    logger.experiment.log_figure(logger.run_id, figure, CURVE_FIGURE)
