"""The pieces `src.run` assembles: Hydra context, run naming/tags, callbacks, and what is logged after test."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from src.backbones import BACKBONES
from src.backbones.base import Backbone
from src.config import RunConfig, validate
from src.finetune.init import CHECKPOINT_ARTIFACT, load_backbone
from src.finetune.strategy import Strategy
from src.module import TransferModule
from src.schema import blame
from src.signals import STOP
from src.tracking import MLflowRun, TrainingStateLogger, flatten, resume
from src.tracking.mlflow_run import git_commit, unique_name
from src.tracking.plots import confusion_matrix_figure

log = logging.getLogger(__name__)


@dataclass
class HydraContext:
    launch_dir: Path
    output_dir: Path
    multirun_dir: str | None
    job_num: int | None
    overrides: list[str]
    choices: dict[str, str]  # config-group options picked, e.g. {"data": "sst2"}: the names users know


def hydra_context() -> HydraContext:
    """Where the user launched from and which multirun job this is (plain defaults outside Hydra)."""
    if not HydraConfig.initialized():
        cwd = Path.cwd()
        return HydraContext(cwd, Path(tempfile.mkdtemp(prefix="run-")), None, None, [], {})
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    return HydraContext(
        launch_dir=Path(hc.runtime.cwd),
        output_dir=Path(hc.runtime.output_dir),
        multirun_dir=str(Path(hc.runtime.cwd, hc.sweep.dir)) if multirun else None,
        job_num=hc.job.num if multirun else None,
        overrides=list(hc.overrides.task),
        choices={k: str(v) for k, v in hc.runtime.choices.items() if v is not None},
    )


def run_name(cfg: RunConfig, context: HydraContext) -> str:
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    job = f"-j{context.job_num}" if context.job_num is not None else ""
    labels = group_labels(cfg, context)
    return unique_name(f"{labels['data']}-{labels['backbone']}-{labels['finetune']}-s{cfg.seed}{job}")


def group_labels(cfg: RunConfig, context: HydraContext) -> dict[str, str]:
    """Each swappable group as the user picked it (the config option, e.g. `sst2`), else its registry name."""
    return {group: context.choices.get(group, getattr(cfg, group).name) for group in ("data", "backbone", "finetune")}


def tags(cfg: RunConfig, context: HydraContext) -> dict[str, str]:
    out = {
        **group_labels(cfg, context),
        "seed": str(cfg.seed),
        "git_commit": git_commit(Path(__file__).parent),
        "output_dir": str(context.output_dir),
    }
    if context.multirun_dir is not None:
        out |= {"multirun_dir": context.multirun_dir, "job_num": str(context.job_num)}
    return out


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


def callbacks(
    cfg: RunConfig, extra: list[pl.Callback], context: HydraContext
) -> tuple[ModelCheckpoint, list[pl.Callback]]:
    """Checkpointing on the objective, per-epoch state logging, early stopping, plus strategy/regularizer ones."""
    mode = "max" if cfg.objective.direction == "maximize" else "min"
    checkpoint = ModelCheckpoint(
        dirpath=context.output_dir / "checkpoints",
        filename="best",
        monitor=cfg.objective.metric,
        mode=mode,
        save_last=True,
    )
    # Strategy/regularizer callbacks first: the logger records the state they set at each epoch start.
    out: list[pl.Callback] = [checkpoint, *extra, TrainingStateLogger()]
    stopping = cfg.regularization.early_stopping
    if stopping.patience is not None:
        out.append(EarlyStopping(cfg.objective.metric, stopping.min_delta, stopping.patience, mode=mode))
    return checkpoint, out


def log_results(tracker: MLflowRun, cfg: RunConfig, module: TransferModule, datamodule: pl.LightningDataModule) -> None:
    """After test (best weights loaded): confusion matrix, label mapping and the weights-only checkpoint."""
    matrix = module.confusion.compute().cpu().numpy()
    tracker.log_figure(confusion_matrix_figure(matrix, datamodule.class_names), "confusion_matrix.png")
    tracker.log_dict(datamodule.label_mapping, "label_mapping.json")
    if cfg.tracking.log_checkpoint:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, Path(CHECKPOINT_ARTIFACT).name)
            torch.save({"state_dict": module.state_dict(), "class_names": datamodule.class_names}, path)
            tracker.log_artifact(path, str(Path(CHECKPOINT_ARTIFACT).parent))


def objective_value(
    cfg: RunConfig, trainer: pl.Trainer, checkpoint: ModelCheckpoint, tracker: MLflowRun
) -> float | list[float]:
    """The best validation value of the objective metric over the run; with secondary objectives a list that
    adds the last logged value of each (read back from MLflow, which holds every metric the run logged)."""
    score = checkpoint.best_model_score
    if score is None:
        score = trainer.callback_metrics[cfg.objective.metric]
    if not cfg.objective.secondary:
        return float(score)
    logged = tracker.client.get_run(tracker.run_id).data.metrics
    missing = [s.metric for s in cfg.objective.secondary if s.metric not in logged]
    if missing:
        raise KeyError(f"objective.secondary: {missing} never logged; logged: {sorted(logged)}")
    return [float(score), *(logged[s.metric] for s in cfg.objective.secondary)]
