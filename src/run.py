"""Entry point: `python -m src.run [overrides]` (single run) or `python -m src.run -m ...` (sweeps).

compose + validate config -> build backbone, data, module, callbacks, trainer -> fit -> test the best
checkpoint -> return the objective (so any Hydra sweeper can optimise it).
"""

from __future__ import annotations

import logging
import uuid
import warnings
from functools import partial

import hydra
import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf

from src import build, lr_finder, preflight, regularization
from src.config import RunConfig, validate
from src.data import DATA
from src.errors import one_clear_answer
from src.finetune import FINETUNE
from src.health import HealthCheck
from src.module import ClassifierHead, TransferModule
from src.optim import configure_optimizers
from src.signals import STOP
from src.sweep.trial import JobTrial
from src.tracking import MLflowRun
from src.tracking.resume import ResumePoint

log = logging.getLogger(__name__)
# Library noise printed on every run that a user cannot act on: Lightning's LitLogger advert, and Lightning's use
# of a pytree API that torch 2.13 deprecates.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: "litlogger" not in r.getMessage())
warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
# `${uid:}` in conf/hydra: output folders unique even for runs started in the same second; cached in the config,
# so every job of a multirun (also in launcher worker processes) sees the same value.
OmegaConf.register_new_resolver("uid", lambda: uuid.uuid4().hex[:6], use_cache=True, replace=True)


def run(
    cfg: RunConfig, raw: DictConfig, context: build.HydraContext, resume: ResumePoint | None
) -> float | list[float]:
    trial = JobTrial(cfg.extra.get("sweep"), cfg.objective)  # the Optuna trial of a sweep job; a no-op otherwise
    with (
        MLflowRun(
            cfg.tracking,
            context.launch_dir,
            build.run_name(cfg, context),
            build.tags(cfg, context),
            resume_run_id=resume and resume.run_id,
        ) as tracker,
        trial.running(tracker),
    ):
        build.start(tracker, raw, context, resumed=resume is not None)
        pl.seed_everything(cfg.seed, workers=True)
        strategy = FINETUNE.build(raw.finetune, client=tracker.client)
        backbone = build.backbone(cfg, raw, strategy, tracker.client)
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
        health = HealthCheck(cfg.optim.lr)
        checkpoint, callbacks = build.callbacks(cfg, [*strategy.callbacks(), *regularizers.callbacks], context)
        trainer = pl.Trainer(
            **cfg.trainer, callbacks=[*callbacks, health, STOP, *trial.callbacks()], logger=tracker.logger()
        )
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume.checkpoint if resume else cfg.ckpt_path)
        tracker.set_tags(health.tags())
        trainer.test(module, datamodule=datamodule, ckpt_path=checkpoint.best_model_path or None)
        build.log_results(tracker, cfg, module, datamodule)
        return trial.complete(build.objective_value(cfg, trainer, checkpoint, tracker))


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(raw: DictConfig) -> float | list[float]:
    context = build.hydra_context()
    STOP.install()
    with one_clear_answer(context.output_dir, multirun=context.job_num is not None):
        OmegaConf.resolve(raw)
        cfg = validate(raw)
        preflight.check(cfg, context.launch_dir)
        cfg, raw, context, resume = build.resume_point(cfg, raw, context)
        return run(cfg, raw, context, resume)


if __name__ == "__main__":
    main()
