"""MLflow tracking: one MLflow run per job, created before training and closed FINISHED or FAILED."""

from src.tracking.callbacks import TrainingStateLogger
from src.tracking.mlflow_run import EpochMLFlowLogger, MLflowRun, flatten, resolve_uri

__all__ = ["EpochMLFlowLogger", "MLflowRun", "TrainingStateLogger", "flatten", "resolve_uri"]
