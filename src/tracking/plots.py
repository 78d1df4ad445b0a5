"""Figures logged as MLflow artifacts."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


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
