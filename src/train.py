"""One run, top to bottom: validate + preflight -> build backbone, data, module, callbacks, trainer -> fit -> test
the best checkpoint -> return the objective (so any Hydra sweeper can optimise it). `src.run` is the CLI around it.
"""

from __future__ import annotations

import logging
import warnings
from functools import partial

import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf

from src import build, features, lr_finder, preflight, regularization
from src.adapt import ADAPT
from src.adapt.selection import TargetEvaluation
from src.cache import keep_warm
from src.config import RunConfig, validate
from src.context import HydraContext, hydra_context
from src.data import DATA
from src.errors import one_clear_answer
from src.eval_sets import EvalSets
from src.finetune import FINETUNE
from src.health import HealthCheck
from src.module import Head, TransferModule
from src.optim import configure_optimizers
from src.signals import STOP
from src.sweep.trial import JobTrial
from src.tasks import TASKS
from src.tracking import MLflowRun
from src.tracking.resume import ResumePoint
from src.tracking.summary import run_summary

log = logging.getLogger(__name__)
# Library noise printed on every run that a user cannot act on: Lightning's LitLogger advert, and Lightning's use
# of a pytree API that torch 2.13 deprecates.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: "litlogger" not in r.getMessage())
warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
# Lightning advice that does not apply: short epochs log at epoch level anyway; frozen groups run in eval mode on
# purpose (the BN policy); a run on a SLURM login node is meant to run there.
warnings.filterwarnings("ignore", r".*smaller than the logging interval")
warnings.filterwarnings("ignore", r".*in eval mode at the start of training")
warnings.filterwarnings("ignore", r".*The `srun` command is available on your system but is not used")


def run(cfg: RunConfig, raw: DictConfig, context: HydraContext, resume: ResumePoint | None) -> float | list[float]:
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
        keep_warm(cfg.cache.warm_gb)
        pl.seed_everything(cfg.seed, workers=True)
        strategy = FINETUNE.build(raw.finetune, client=tracker.client)
        backbone = build.backbone(cfg, raw, strategy, tracker.client)
        task = TASKS.build(raw.task)
        datamodule = DATA.build(raw.data, preprocessing=backbone.preprocessing, seed=cfg.seed, task=task, cv=cfg.cv)
        datamodule.setup("fit")  # binds the task: its outputs, and what it learns from the training targets
        adapter = ADAPT.build(raw.adapt, feature_dim=backbone.feature_dim, num_classes=task.num_outputs)
        datamodule.target_role = adapter.target_role
        build.log_dataset(tracker, datamodule, build.group_labels(cfg, context)["data"])
        regularizers = regularization.build(cfg.regularization, backbone, task)
        head = Head(backbone.feature_dim, task.num_outputs, cfg.regularization.head_dropout)
        module = TransferModule(
            backbone,
            head,
            task,
            configure_optim=partial(
                configure_optimizers,
                cfg=cfg.optim,
                weight_decay=cfg.regularization.weight_decay,
                restarts=strategy.schedule_restarts(),
            ),
            label_smoothing=cfg.regularization.label_smoothing,
            batch_transforms=regularizers.batch_transforms,
            loss_terms=strategy.loss_terms() + regularizers.loss_terms + adapter.loss_terms(),
            ce_weight=strategy.ce_weight,
            aux_modules=adapter.modules(),
        )
        module.fixed_state = features.fixed_state(strategy, module, backbone, features.horizon(cfg))
        cached = features.use_cache(cfg, strategy, module, datamodule, bool(regularizers.batch_transforms), tracker)
        if cfg.optim.lr_find:  # may set cfg.optim.lr, which configure_optim reads at fit
            lr_finder.run(tracker, module, datamodule, cfg.optim, strategy.callbacks(), cfg.trainer)
        health = HealthCheck(cfg.optim.lr, task)
        extra = [*strategy.callbacks(), *regularizers.callbacks, *cached]
        if datamodule.has_target:  # target-domain metrics and label-free selection scores (src.adapt)
            extra.append(TargetEvaluation(datamodule, cfg.objective.metric, cfg.objective.direction == "maximize"))
        if cfg.data.eval_sets:  # test/<name>/<metric> of every named evaluation set
            extra.append(EvalSets(cfg.data.eval_sets_every_val))
        checkpoint, callbacks = build.callbacks(cfg, extra, context)
        trainer = pl.Trainer(
            **cfg.trainer, callbacks=[*callbacks, health, STOP, *trial.callbacks()], logger=tracker.logger()
        )
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume.checkpoint if resume else cfg.ckpt_path)
        tracker.set_tags(health.tags())
        best = checkpoint.best_model_path if checkpoint else None  # None: test the weights as they are
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None)
        value = build.objective_value(cfg, trainer, checkpoint, tracker)
        keep = build.keeps_weights(cfg, context, trial, tracker, value)
        build.log_results(tracker, cfg, raw, module, datamodule, context, keep_weights=keep)
        value = trial.complete(value)
    if tracker.leader:  # DDP: one summary, from rank 0
        print(run_summary(tracker.client.get_run(tracker.run_id), cfg.objective.metric, tracker.uri), flush=True)
    return value


def log_through_root() -> None:
    """Let Lightning's log lines reach the terminal once, through the root logger's handlers (Hydra's console
    and job-log file). `import lightning` puts its own console handler on the `lightning` logger, which then also
    propagates to root: every INFO line printed twice. Kept as is when root has no handler (no Hydra), where
    Lightning's handler is the only one."""
    if not logging.getLogger().handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
            logger.removeHandler(handler)
        logger.propagate = True


def execute(raw: DictConfig, context: HydraContext | None = None) -> float | list[float] | None:
    """A composed config, end to end: every failure becomes one line and an exit code (src.errors)."""
    context = context or hydra_context()
    log_through_root()
    STOP.install()
    with one_clear_answer(context.output_dir, multirun=context.job_num is not None):
        OmegaConf.resolve(raw)
        cfg = validate(raw)
        preflight.check(cfg, context.launch_dir)
        cfg, raw, context, resume = build.resume_point(cfg, raw, context)
        return run(cfg, raw, context, resume)
