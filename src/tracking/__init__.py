"""MLflow tracking: one MLflow run per job, created before training and closed FINISHED or FAILED.

The names below load on first use: Hydra imports `src.tracking.multirun` (its callback) at start-up, before the
config is validated, and that must not pull in MLflow and Lightning.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "EpochMLFlowLogger": "src.tracking.mlflow_run",
    "MLflowRun": "src.tracking.mlflow_run",
    "TrainingStateLogger": "src.tracking.callbacks",
    "flatten": "src.tracking.mlflow_run",
    "resolve_uri": "src.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
