"""Entry point: `python -m src.run [overrides]` (single run) or `python -m src.run -m ...` (sweeps).

compose + validate config -> build backbone, data, module, callbacks, trainer -> fit -> test the best
checkpoint -> return the objective (so any Hydra sweeper can optimise it).
"""

from __future__ import annotations

import logging
import sys
import warnings
from functools import partial

import hydra
import lightning.pytorch as pl
from omegaconf import DictConfig

from src import build, lr_finder, regularization
from src.backbones import BACKBONES
from src.config import ConfigError, RunConfig, validate
from src.data import DATA
from src.finetune import FINETUNE
from src.finetune.init import load_backbone
from src.module import ClassifierHead, TransferModule
from src.optim import configure_optimizers
from src.sweep.trial import JobTrial
from src.tracking import MLflowRun

log = logging.getLogger(__name__)
# Library noise printed on every run that a user cannot act on: Lightning's LitLogger advert, and Lightning's use
# of a pytree API that torch 2.13 deprecates.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: "litlogger" not in r.getMessage())
warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)


def run(cfg: RunConfig, raw: DictConfig) -> float | list[float]:
    context = build.hydra_context()
    trial = JobTrial(cfg.extra.get("sweep"), cfg.objective)  # the Optuna trial of a sweep job; a no-op otherwise
    with (
        MLflowRun(cfg.tracking, context.launch_dir, build.run_name(cfg, context), build.tags(cfg, context)) as tracker,
        trial.running(tracker),
    ):
        build.log_config(tracker, raw, context)
        pl.seed_everything(cfg.seed, workers=True)
        strategy = FINETUNE.build(raw.finetune, client=tracker.client)
        backbone = BACKBONES.build(raw.backbone, pretrained=strategy.pretrained)
        if cfg.finetune.init_from:
            load_backbone(backbone, cfg.finetune.init_from, tracker.client)
        backbone = strategy.prepare(backbone)
        datamodule = DATA.build(raw.data, preprocessing=backbone.preprocessing, seed=cfg.seed)
        datamodule.setup("fit")
        regularizers = regularization.build(cfg.regularization, backbone, datamodule.num_classes)
        head = ClassifierHead(backbone.feature_dim, datamodule.num_classes, cfg.regularization.head_dropout)
        module = TransferModule(
            backbone,
            head,
            datamodule.num_classes,
            configure_optim=partial(
                configure_optimizers,
                cfg=cfg.optim,
                weight_decay=cfg.regularization.weight_decay,
                restarts=strategy.schedule_restarts(),
            ),
            label_smoothing=cfg.regularization.label_smoothing,
            batch_transforms=regularizers.batch_transforms,
            loss_terms=strategy.loss_terms() + regularizers.loss_terms,
            ce_weight=strategy.ce_weight,
        )
        if cfg.optim.lr_find:  # may set cfg.optim.lr, which configure_optim reads at fit
            lr_finder.run(tracker, module, datamodule, cfg.optim, strategy.callbacks(), cfg.trainer)
        checkpoint, callbacks = build.callbacks(cfg, [*strategy.callbacks(), *regularizers.callbacks], context)
        trainer = pl.Trainer(**cfg.trainer, callbacks=[*callbacks, *trial.callbacks()], logger=tracker.logger())
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        trainer.test(module, datamodule=datamodule, ckpt_path=checkpoint.best_model_path or None)
        build.log_results(tracker, cfg, module, datamodule)
        return trial.complete(build.objective_value(cfg, trainer, checkpoint, tracker))


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(raw: DictConfig) -> float | list[float]:
    try:  # a ConfigError from run(): a check that needs the built backbone (e.g. the image size it takes)
        return run(validate(raw), raw)
    except ConfigError as e:
        print(f"Invalid config: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
