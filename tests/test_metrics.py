"""Metrics cross-checked against scikit-learn on a known batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from src.metrics import classification_metrics, update


@pytest.mark.parametrize("num_classes", [2, 4])
def test_metrics_match_sklearn(num_classes: int) -> None:
    gen = torch.Generator().manual_seed(num_classes)
    labels = torch.arange(60) % num_classes
    logits = torch.randn(60, num_classes, generator=gen) + 1.5 * torch.nn.functional.one_hot(labels, num_classes)
    metrics = classification_metrics(num_classes, "val/")
    update(metrics, logits[:25], labels[:25])  # two batches, as in an epoch
    update(metrics, logits[25:], labels[25:])
    got = {k: float(v) for k, v in metrics.compute().items()}

    y, probs = labels.numpy(), logits.softmax(-1).numpy()
    pred = probs.argmax(-1)
    auroc = roc_auc_score(y, probs[:, 1]) if num_classes == 2 else roc_auc_score(y, probs, multi_class="ovr")
    expected = {
        "val/acc": accuracy_score(y, pred),
        "val/precision": precision_score(y, pred, average="macro"),
        "val/recall": recall_score(y, pred, average="macro"),
        "val/f1": f1_score(y, pred, average="macro"),
        "val/auroc": auroc,
    }
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, atol=1e-5, err_msg=key)
    assert got["val/acc"] < 1.0, "the batch must not be trivially separable, or the check proves little"
