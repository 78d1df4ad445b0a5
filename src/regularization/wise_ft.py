"""WiSE-FT (Wortsman et al. 2022): evaluate (1 - alpha) * pretrained + alpha * fine-tuned backbone weights.

With a list of alphas (`regularization.wise_ft_alpha=[0,0.5,1]`) one run traces the curve: every alpha is scored
from the one fine-tuned checkpoint on the split tested and on every named evaluation set, logged as
`test/wise_ft/<alpha>/<metric>` and `test/wise_ft/<alpha>/<set>/<metric>`, with a figure of the ID-vs-shift curve
(`wise_ft_curve.png`) and its numbers (`wise_ft_curve.json`). The test pass itself, its plain `test/*` metrics and
the logged model, then use the LAST alpha listed, as a single alpha does.
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


class WiseFT(pl.Callback):
    """Interpolates the backbone (the head is new, it has no pretrained weights) when testing starts, i.e. after
    the best checkpoint is loaded; the logged checkpoint then holds the interpolated weights that were tested.
    With `curve`, first scores every alpha in `alphas` (see the module docstring); the last one is kept.
    """

    def __init__(self, reference: PretrainedReference, alphas: list[float], curve: bool = False) -> None:
        self.reference, self.alphas, self.curve = reference, alphas, curve

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        backbone = pl_module.backbone
        if self.curve:
            fine_tuned = PretrainedReference(backbone)  # a snapshot; interpolating to alpha 0 restores it exactly
            points: dict[str, dict[str, float]] = {}
            for alpha in self.alphas:
                self.reference.interpolate(backbone, alpha)
                metrics = tested_and_eval_sets(trainer, pl_module, f"test/{WISE_FT}/{alpha_name(alpha)}/")
                pl_module.log_dict(metrics)
                points[alpha_name(alpha)] = {k: float(v) for k, v in metrics.items()}
                fine_tuned.interpolate(backbone, 0.0)
            self._log_curve(trainer, points)
        self.reference.interpolate(backbone, self.alphas[-1])

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
