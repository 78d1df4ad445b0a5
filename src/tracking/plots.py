"""Figures logged as MLflow artifacts."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from src.regularization.config import WISE_FT  # noqa: E402


def confusion_matrix_figure(matrix: np.ndarray, class_names: list[str]) -> Figure:
    """Counts with row-normalised colour, so small classes stay readable."""
    n = len(class_names)
    size = min(12.0, 2.5 + 0.5 * n)
    fig, ax = plt.subplots(figsize=(size, size))
    norm = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title="Test confusion matrix")
    ax.set_xticklabels(class_names, rotation=45, ha="right")
    ax.set_yticklabels(class_names)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                color = "white" if norm[i, j] > 0.5 else "black"
                ax.text(j, i, int(matrix[i, j]), ha="center", va="center", color=color, fontsize=8)
    fig.tight_layout()
    return fig


def wise_ft_figure(points: dict[str, dict[str, float]], metric: str, sets: list[str]) -> Figure:
    """WiSE-FT's curve from `points` (alpha -> its `test/wise_ft/<alpha>/...` metrics): `metric` on each
    evaluation set (without sets: on the split tested) against the split tested, one line per set through the
    alphas in increasing order, each point labelled with its alpha (the robustness/accuracy trade-off)."""
    alphas = sorted(points, key=float)
    fig, ax = plt.subplots(figsize=(6, 5))
    id_values = [points[a][f"test/{WISE_FT}/{a}/{metric}"] for a in alphas]
    for name in sets or [None]:  # without sets the curve is the diagonal: still shows where each alpha lands
        key = metric if name is None else f"{name}/{metric}"
        values = [points[a][f"test/{WISE_FT}/{a}/{key}"] for a in alphas]
        ax.plot(id_values, values, marker="o", label=name or "test")
        for alpha, x, y in zip(alphas, id_values, values, strict=True):
            ax.annotate(alpha, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(xlabel=f"test {metric} (ID)", ylabel=f"{metric} under shift", title="WiSE-FT: ID vs shift over alpha")
    ax.legend()
    fig.tight_layout()
    return fig
