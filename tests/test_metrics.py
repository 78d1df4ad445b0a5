"""Each task's metrics cross-checked against scikit-learn / SciPy on known outputs (what `trainer.test` logs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    hamming_loss,
    mean_absolute_error,
    precision_score,
    r2_score,
    recall_score,
    roc_auc_score,
)

from src.tasks import TASKS


def bound(name: str, names: list[str], train: np.ndarray | None = None, **cfg: object):
    task = TASKS.build({"name": name, **cfg})
    task.bind(names, train)
    return task


def check(got: dict[str, torch.Tensor], expected: dict[str, float]) -> None:
    for key, value in expected.items():
        np.testing.assert_allclose(float(got[key]), value, atol=1e-5, err_msg=key)


@pytest.mark.parametrize("num_classes", [2, 4])
def test_classification_metrics_match_sklearn(num_classes: int) -> None:
    gen = torch.Generator().manual_seed(num_classes)
    labels = torch.arange(60) % num_classes
    logits = torch.randn(60, num_classes, generator=gen) + 1.5 * torch.nn.functional.one_hot(labels, num_classes)
    task = bound("classification", [str(i) for i in range(num_classes)])
    got = task.evaluate(logits, labels.float(), "val/")  # targets arrive as floats from the collected pass

    y, probs = labels.numpy(), logits.softmax(-1).numpy()
    pred = probs.argmax(-1)
    auroc = roc_auc_score(y, probs[:, 1]) if num_classes == 2 else roc_auc_score(y, probs, multi_class="ovr")
    check(
        got,
        {
            "val/acc": accuracy_score(y, pred),
            "val/precision": precision_score(y, pred, average="macro"),
            "val/recall": recall_score(y, pred, average="macro"),
            "val/f1": f1_score(y, pred, average="macro"),
            "val/auroc": auroc,
            "val/majority_share": np.bincount(pred, minlength=num_classes).max() / len(pred),
        },
    )
    assert set(got) == {f"val/{m}" for m in task.cfg.METRICS}
    assert float(got["val/acc"]) < 1.0, "the batch must not be trivially separable, or the check proves little"


def test_multilabel_metrics_match_sklearn_and_tuned_thresholds_help() -> None:
    rng = np.random.default_rng(0)
    truth = (rng.random((200, 5)) < [0.5, 0.3, 0.2, 0.1, 0.05]).astype(np.float32)
    logits = rng.normal(size=truth.shape) + 1.2 * truth - 0.8  # informative, and biased towards "no tag"
    outputs = torch.tensor(logits, dtype=torch.float32)
    task = bound("multilabel", list("abcde"), truth)
    got = task.evaluate(outputs, torch.tensor(truth), "val/")
    pred = (1 / (1 + np.exp(-logits)) >= 0.5).astype(int)
    probs = 1 / (1 + np.exp(-logits))
    check(
        got,
        {
            "val/micro_f1": f1_score(truth, pred, average="micro"),
            "val/macro_f1": f1_score(truth, pred, average="macro"),
            "val/map": average_precision_score(truth, probs, average="macro"),
            "val/subset_acc": accuracy_score(truth, pred),
            "val/hamming": hamming_loss(truth, pred),
            "val/no_label_share": float((pred.sum(1) == 0).mean()),
        },
    )
    assert set(got) == {f"val/{m}" for m in task.cfg.METRICS}

    tuned = bound("multilabel", list("abcde"), truth, threshold="tune")
    tuned.on_validation(outputs, torch.tensor(truth))
    assert not torch.allclose(tuned.thresholds, torch.full((5,), 0.5))
    after = tuned.evaluate(outputs, torch.tensor(truth), "val/")
    assert float(after["val/macro_f1"]) > float(got["val/macro_f1"]) + 0.02
    columns = tuned.predict(logits[:3])
    assert set(columns) == {"labels", *(f"prob_{n}" for n in "abcde")}


def test_regression_metrics_are_in_original_units() -> None:
    rng = np.random.default_rng(1)
    train = rng.normal(50.0, 10.0, size=(300, 1)).astype(np.float32)
    truth = rng.normal(50.0, 10.0, size=(120, 1)).astype(np.float32)
    predicted = truth + rng.normal(0, 4.0, size=truth.shape).astype(np.float32)
    task = bound("regression", ["score"], train)
    assert abs(float(task.mean) - 50) < 2 and abs(float(task.std) - 10) < 2
    outputs = (torch.tensor(predicted) - task.mean) / task.std  # what a head trained on scaled targets emits
    got = task.evaluate(outputs, torch.tensor(truth), "val/")
    p, t = predicted[:, 0], truth[:, 0]
    check(
        got,
        {
            "val/mae": mean_absolute_error(t, p),
            "val/rmse": float(np.sqrt(((p - t) ** 2).mean())),
            "val/r2": r2_score(t, p),
            "val/pearson": pearsonr(t, p)[0],
            "val/spearman": spearmanr(t, p)[0],
            "val/std_ratio": p.std(ddof=1) / t.std(ddof=1),
        },
    )
    assert set(got) == {f"val/{m}" for m in task.cfg.METRICS}
    np.testing.assert_allclose(task.predict(outputs.numpy())["pred_score"], p, rtol=1e-5)
    constant = task.evaluate(torch.zeros_like(outputs), torch.tensor(truth), "val/")
    assert task.collapse_message(float(constant["val/std_ratio"]), 1e-3)[0] == "constant"
