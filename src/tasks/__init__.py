"""Tasks: what a run predicts (`task=classification|multilabel|regression`); one registered module each. Each
option's schema is registered in `src.tasks.config`; its module loads when built."""

from src.tasks.config import TASKS

__all__ = ["TASKS"]
