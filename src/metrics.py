"""Classification metrics (torchmetrics) shared by validation and test: one definition, two prefixes."""

from __future__ import annotations

import torch
from torchmetrics import AUROC, Accuracy, F1Score, MetricCollection, Precision, Recall

# Every validation metric a run logs (`val/<name>`): what `objective.metric` may name.
VAL_METRICS = ("acc", "precision", "recall", "f1", "auroc", "loss", "majority_share")


def classification_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """Accuracy, macro precision/recall/F1 and AUROC (binary or one-vs-rest macro), fed with logits."""
    common = {"task": "multiclass", "num_classes": num_classes}
    metrics = {
        "acc": Accuracy(**common),
        "precision": Precision(**common, average="macro"),
        "recall": Recall(**common, average="macro"),
        "f1": F1Score(**common, average="macro"),
        "auroc": AUROC(task="binary") if num_classes == 2 else AUROC(**common, average="macro"),
    }
    return MetricCollection(metrics, prefix=prefix)


def update(metrics: MetricCollection, logits: torch.Tensor, labels: torch.Tensor) -> None:
    """Feed probabilities; binary AUROC takes the positive-class probability."""
    probs = logits.float().softmax(-1)
    for name, metric in metrics.items():
        if name.endswith("auroc") and probs.shape[-1] == 2:
            metric.update(probs[:, 1], labels)
        else:
            metric.update(probs, labels)
