"""The pieces `src.run` assembles: Hydra context, run naming/tags, callbacks, and what is logged after test."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import (
    MLFLOW_DATASET_CONTEXT,
    MLFLOW_PARENT_RUN_ID,
    MLFLOW_RUN_NOTE,
)
from omegaconf import DictConfig, OmegaConf

from src.backbones import BACKBONES
from src.backbones.base import Backbone
from src.cache import fingerprint, path_digest
from src.config import RunConfig, validate
from src.context import HydraContext
from src.data.common import DataModule
from src.finetune.init import CHECKPOINT_ARTIFACT, load_backbone
from src.finetune.strategy import Strategy
from src.module import TransferModule
from src.schema import blame
from src.serving import export
from src.signals import STOP
from src.sweep.trial import JobTrial
from src.tracking import MLflowRun, TrainingStateLogger, flatten, multirun, naming, resume
from src.tracking.mlflow_run import source_tags
from src.tracking.summary import EVAL_SETS_TAG, best_metric, test_metric

log = logging.getLogger(__name__)


def run_name(cfg: RunConfig, context: HydraContext) -> str:
    """What varies first (see src.tracking.naming): a sweep trial `t07·lr=3.1e-4·…`, a grid job by the grid's swept
    keys `lp_ft·s0`, a single run by its strategy and overrides `linear_probe·lr=0.01·s0·3fa2` (suffix: unique)."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    sweep = cfg.extra.get("sweep")
    if sweep is not None and sweep.get("trial") is not None:
        return naming.SEP.join([f"t{int(sweep.trial):02d}", *naming.from_overrides(context.overrides)])
    grid = multirun.read(context.multirun_dir)
    if grid is not None:
        return naming.SEP.join(naming.from_overrides(context.overrides, grid.varying) or [f"j{context.job_num}"])
    rest = [o for o in context.overrides if not o.lstrip("+").startswith(("finetune=", "seed="))]
    parts = [group_labels(cfg, context)["finetune"], *naming.from_overrides(rest), f"s{cfg.seed}"]
    return naming.SEP.join([*parts, naming.unique_suffix()])


def group_labels(cfg: RunConfig, context: HydraContext) -> dict[str, str]:
    """Each swappable group as the user picked it (the config option, e.g. `sst2`), else its registry name."""
    return {
        group: context.choices.get(group, getattr(cfg, group).name)
        for group in ("data", "backbone", "finetune", "adapt")
    }


def description(cfg: RunConfig, context: HydraContext, result: str = "") -> str:
    """The run's note in the MLflow UI: what it is in one sentence, and its result once known."""
    g = group_labels(cfg, context)
    text = f"finetune={g['finetune']} of backbone={g['backbone']} on data={g['data']}, seed {cfg.seed}."
    return f"{text} {result}".strip()


def tags(cfg: RunConfig, context: HydraContext) -> dict[str, str]:
    """Our tags (the group options, seed, where outputs are) plus MLflow's standard source/commit/user tags, which
    fill the Source and User columns of the runs table; a grid job is nested under its grid's parent run."""
    out = {
        **group_labels(cfg, context),
        "seed": str(cfg.seed),
        "output_dir": str(context.output_dir),
        **source_tags("python -m src.run " + " ".join(context.overrides)),
        MLFLOW_RUN_NOTE: description(cfg, context),
    }
    if cfg.data.eval_sets:  # which `test/<name>/*` metrics the run has, for src.compare
        out[EVAL_SETS_TAG] = ",".join(cfg.data.eval_sets)
    if context.multirun_dir is not None:
        out |= {"multirun_dir": context.multirun_dir, "job_num": str(context.job_num)}
        grid = multirun.read(context.multirun_dir)
        if grid is not None and not cfg.tracking.parent_run_id:
            out[MLFLOW_PARENT_RUN_ID] = grid.parent_run_id
    return out


def log_dataset(tracker: MLflowRun, datamodule: DataModule, name: str) -> None:
    """The data as an MLflow dataset input (the Dataset column): its name, source, a content digest and sizes;
    and what its cache saved (`cache/<namespace>/*`)."""
    cfg = datamodule.cfg
    source = next((str(getattr(cfg, k)) for k in ("train_path", "train_dir") if getattr(cfg, k, None)), cfg.name)
    path = Path(source)
    digest = path_digest(path) if path.exists() else fingerprint(asdict(cfg))  # memoised: the caches hash it too
    sizes = {split: len(data) for split, data in datamodule._splits.items()}
    profile = {
        "task": datamodule.task.name,
        "num_outputs": datamodule.task.num_outputs,
        **{f"num_{k}": v for k, v in sizes.items()},
    }
    dataset = Dataset(name, digest[:16], "local" if path.exists() else "builtin", source, profile=json.dumps(profile))
    tracker.log_inputs([DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, "training")])])
    cache = getattr(datamodule, "cache", None)  # the read-and-tokenise cache of tables (src.data.text_table)
    if cache is not None:
        tracker.log_metrics(cache.stats.as_metrics(cache.namespace))


def start(tracker: MLflowRun, raw: DictConfig, context: HydraContext, resumed: bool) -> None:
    """Record the run where a restart of this job finds it, arm the stop signals with its checkpoint, and log its
    config (a resumed run keeps the params it started with; its overrides are kept as a tag)."""
    resume.record(context.output_dir, tracker.run_id)
    STOP.checkpoint = context.output_dir / resume.LAST_CHECKPOINT
    STOP.run_id = tracker.run_id
    if resumed:
        tracker.set_tags({"resumed_with": " ".join(context.overrides) or "(no overrides)"})
        return
    resolved = OmegaConf.to_container(raw, resolve=True)
    tracker.log_params(flatten(resolved))
    tracker.log_text(OmegaConf.to_yaml(resolved), resume.CONFIG_ARTIFACT)
    tracker.log_text("\n".join(context.overrides) + "\n", "overrides.txt")


def resume_point(
    cfg: RunConfig, raw: DictConfig, context: HydraContext
) -> tuple[RunConfig, DictConfig, HydraContext, resume.ResumePoint | None]:
    """What this start continues: `resume=<run id>|last` (that run's stored config, plus any key=value overrides
    given beside it), or the run an earlier start of this same job left in its output folder (a requeue)."""
    if cfg.resume is None:
        point = resume.requeued(context.output_dir)
        if point is not None:
            log.warning("resuming run %s from %s (this job ran here before)", point.run_id, point.checkpoint)
        return cfg, raw, context, point
    point, stored = resume.point(cfg.resume, cfg.tracking.experiment, cfg.tracking.uri, context.launch_dir)
    raw = resume.with_overrides(stored, context.overrides)
    cfg = validate(raw)
    log.warning("resuming run %s from %s", point.run_id, point.checkpoint)
    return cfg, raw, replace(context, output_dir=point.output_dir), point


def backbone(cfg: RunConfig, raw: DictConfig, strategy: Strategy, client: MlflowClient) -> Backbone:
    """The pretrained (or random-init) backbone, from an earlier run's weights if asked, adapted by the strategy
    (LoRA adapters), whose freezing schedule is checked against its layer groups before any training."""
    net = BACKBONES.build(raw.backbone, pretrained=strategy.pretrained)
    with blame("finetune"):
        if cfg.finetune.init_from:
            load_backbone(net, cfg.finetune.init_from, client)
        net = strategy.prepare(net)
    epochs = cfg.trainer.get("max_epochs")
    strategy.check(len(net.layer_groups()), epochs if epochs and epochs > 0 else None)
    return net


class EpochCheckpoint(ModelCheckpoint):
    """`best.ckpt` on the objective plus `last.ckpt` (the resume point) after every epoch.

    Lightning, saving at epoch end, writes `last.ckpt` only in epochs that write a top-k checkpoint, so the
    resume point would be the last *improving* epoch; here every epoch writes it. In an epoch that improves,
    `last.ckpt` links to the `best.ckpt` just written instead of writing the same state again (a checkpoint that
    holds a backbone is large: before checkpoints left out the groups no epoch changes, `TransferModule.fixed_state`,
    the second write cost a cached linear-probe epoch a third of its time). Lightning's `save_last="link"` would
    also link in epochs that do not improve, to an older state.
    """

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer) and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        last = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
        best_saved_now = self._last_global_step_saved == trainer.global_step and self.best_model_path
        if best_saved_now and self._last_checkpoint_saved == self.best_model_path:
            self.last_model_path = last
            self._link_checkpoint(trainer, self.best_model_path, last)
            return
        if trainer.is_global_zero and os.path.islink(last):
            os.remove(last)  # never write through the link into best.ckpt
        super()._save_last_checkpoint(trainer, monitor_candidates)


def callbacks(
    cfg: RunConfig, extra: list[pl.Callback], context: HydraContext
) -> tuple[ModelCheckpoint | None, list[pl.Callback]]:
    """Checkpointing on the objective, per-epoch state logging, early stopping, plus strategy/regularizer ones.
    `trainer.enable_checkpointing=false`: no checkpoint (for runs that validate once, at the end, where it would
    be written and never read): test and the logged model use the last weights, a killed run starts over."""
    mode = "max" if cfg.objective.direction == "maximize" else "min"
    checkpoint = None
    if cfg.trainer.get("enable_checkpointing") is not False:
        checkpoint = EpochCheckpoint(
            dirpath=context.output_dir / "checkpoints",
            filename="best",
            monitor=cfg.objective.metric,
            mode=mode,
            save_last=True,
        )
    # Strategy/regularizer callbacks first: the logger records the state they set at each epoch start.
    out: list[pl.Callback] = [*([checkpoint] if checkpoint else []), *extra, TrainingStateLogger()]
    stopping = cfg.regularization.early_stopping
    if stopping.patience is not None:
        out.append(EarlyStopping(cfg.objective.metric, stopping.min_delta, stopping.patience, mode=mode))
    return checkpoint, out


def log_results(
    tracker: MLflowRun,
    cfg: RunConfig,
    raw: DictConfig,
    module: TransferModule,
    datamodule: pl.LightningDataModule,
    context: HydraContext,
    keep_weights: bool = True,
) -> None:
    """After test (best weights loaded): the task's report (confusion matrix, per-tag F1, predicted vs true), the
    label mapping, the run's note with its result, and (unless `keep_weights` is false: a grid job or sweep trial
    that is not the best so far, see `keeps_weights`) the weights-only checkpoint and the loadable, servable model
    (src.serving)."""
    if not tracker.leader:  # DDP: rank 0 logs the run's results and model
        return
    test = {k: float(v) for k, v in module.trainer.callback_metrics.items() if k.startswith("test/")}
    metric = test_metric(cfg.objective.metric)
    if metric in test:
        tracker.set_tags({MLFLOW_RUN_NOTE: description(cfg, context, f"Test {metric[5:]} {test[metric]:.4f}.")})
    if module.test_outputs is not None:
        for name, artifact in module.task.report(*module.test_outputs).items():
            (tracker.log_figure if name.endswith(".png") else tracker.log_dict)(artifact, name)
    tracker.log_dict(datamodule.label_mapping, "label_mapping.json")
    if cfg.tracking.log_checkpoint and keep_weights:
        checkpoint = {"state_dict": module.state_dict(), "class_names": datamodule.names}
        tracker.log_file(partial(torch.save, checkpoint), CHECKPOINT_ARTIFACT)
    if cfg.tracking.log_model and keep_weights:
        export.log_model(tracker, raw, module, datamodule, cfg.tracking.register_model)


def keeps_weights(cfg: RunConfig, context: HydraContext, trial: JobTrial, tracker: MLflowRun, value: Any) -> bool:
    """Whether the run logs its model and checkpoint (`tracking.keep_models`): always alone or with `all`; in a
    sweep while no completed trial beats it; in a grid while no finished job of the grid scored better."""
    if cfg.tracking.keep_models == "all":
        return True
    if trial.settings is not None:
        return trial.keeps_model(value)
    grid = multirun.read(context.multirun_dir)
    if grid is None:
        return True
    first = float(value[0] if isinstance(value, list) else value)
    metric = best_metric(cfg.objective.metric)
    return not multirun.beaten(tracker.client, grid.parent_run_id, metric, cfg.objective.direction, first)


def objective_value(
    cfg: RunConfig, trainer: pl.Trainer, checkpoint: ModelCheckpoint | None, tracker: MLflowRun
) -> float | list[float]:
    """The best validation value of the objective metric over the run (the checkpoint's, else the best of its
    logged history); with secondary objectives a list that adds the last logged value of each (read back from
    MLflow, which holds every metric the run logged)."""
    score = checkpoint.best_model_score if checkpoint is not None else None
    if checkpoint is None and (history := tracker.client.get_metric_history(tracker.run_id, cfg.objective.metric)):
        score = (max if cfg.objective.direction == "maximize" else min)(m.value for m in history)
    if score is None:
        score = trainer.callback_metrics[cfg.objective.metric]
    tracker.log_metrics({best_metric(cfg.objective.metric): float(score)})
    if not cfg.objective.secondary:
        return float(score)
    logged = tracker.client.get_run(tracker.run_id).data.metrics
    missing = [s.metric for s in cfg.objective.secondary if s.metric not in logged]
    if missing:
        raise KeyError(f"objective.secondary: {missing} never logged; logged: {sorted(logged)}")
    return [float(score), *(logged[s.metric] for s in cfg.objective.secondary)]
