"""Task schemas and the task's refusals: torch-free, so a config mistake is answered before any heavy import.

A task is what a run predicts: one class (`classification`), a set of tags (`multilabel`) or numbers
(`regression`). Its YAML names the objective's default metric and direction; the refusals below are the one place
that says which parts of the toolbox a task cannot use, and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from src.registry import Registry
from src.schema import check, check_choice

TASKS: Registry[Any] = Registry("task")


@dataclass
class TaskConfig:
    """Fields every task has: the objective's default (`objective.metric: ${task.metric}`)."""

    name: str = "???"
    metric: str = "val/acc"
    direction: str = "maximize"

    # The `val/<name>` metrics a run of this task logs: what `objective.metric` may name.
    METRICS: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        check_choice(self.direction, "direction", ("maximize", "minimize"))


@TASKS.register("classification", "src.tasks.classification:Classification")
@dataclass
class ClassificationConfig(TaskConfig):
    name: str = "classification"

    METRICS: ClassVar[tuple[str, ...]] = ("acc", "precision", "recall", "f1", "auroc", "loss", "majority_share")


@TASKS.register("multilabel", "src.tasks.multilabel:Multilabel")
@dataclass
class MultilabelConfig(TaskConfig):
    name: str = "multilabel"
    metric: str = "val/macro_f1"
    threshold: Any = 0.5  # probability above which a label is predicted, or "tune": per label, on validation
    pos_weight: bool = False  # weigh each label's positives by negatives/positives in train (rare labels)

    METRICS: ClassVar[tuple[str, ...]] = (
        "micro_f1",
        "macro_f1",
        "map",
        "subset_acc",
        "hamming",
        "loss",
        "no_label_share",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        t = self.threshold
        check(
            t == "tune" or (isinstance(t, int | float) and not isinstance(t, bool) and 0 < t < 1),
            f"threshold: a probability in (0, 1) or 'tune'; got {t!r}",
        )

    @property
    def tuned(self) -> bool:
        return self.threshold == "tune"


@TASKS.register("regression", "src.tasks.regression:Regression")
@dataclass
class RegressionConfig(TaskConfig):
    name: str = "regression"
    metric: str = "val/spearman"
    loss: str = "mse"  # mse | huber | l1
    huber_delta: float = 1.0  # in standardised units when target_scaling is standard
    target_scaling: str = "standard"  # standard: targets scaled to mean 0, std 1 on train | none

    METRICS: ClassVar[tuple[str, ...]] = ("mae", "rmse", "r2", "pearson", "spearman", "loss", "std_ratio")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.loss, "loss", ("mse", "huber", "l1"))
        check(self.huber_delta > 0, f"huber_delta: must be > 0; got {self.huber_delta}")
        check_choice(self.target_scaling, "target_scaling", ("standard", "none"))


# Adaptation methods whose loss or model selection works on class probabilities (softmax).
SOFTMAX_ADAPTATION = ("cdan", "mcc", "entropy")


def refusals(task: TaskConfig, data: Any, finetune: Any, adapt: Any, regularization: Any) -> list[tuple[str, str]]:
    """`(key, why)` for each part of the toolbox this task cannot use with these settings (none: all fine)."""
    columns = getattr(data, "label_column", None)
    if task.name == "classification":
        if isinstance(columns, list) and len(columns) > 1:
            return [
                (
                    "data.label_column",
                    f"{columns}: a class is one column; several columns are tags "
                    "(task=multilabel) or targets (task=regression)",
                )
            ]
        return []
    shape = "a set of tags" if task.name == "multilabel" else "numbers"
    out = []
    if data.name == "image_folder":
        out.append(
            (
                "data",
                f"class folders hold one class per image, not {shape}; list the images in a manifest instead: "
                "data=image_manifest data.train_path=<table with an image path column and the label column(s)>",
            )
        )
    if data.has_target or adapt.name != "none":
        out.append(
            (
                "adapt",
                f"domain adaptation's target evaluation and label-free model selection work on class probabilities; "
                f"task={task.name} predicts {shape}: use task=classification or adapt=none without a target domain",
            )
        )
    if finetune.name == "distill":
        out.append(("finetune", f"distillation matches a teacher's class probabilities; task={task.name} has none"))
    if task.name == "regression" and regularization.label_smoothing > 0:
        out.append(("regularization.label_smoothing", "smooths class targets; a regression target has no classes"))
    if data.name == "digits":
        out.append(("data", "digits is single-label classification; use task=classification"))
    return out
