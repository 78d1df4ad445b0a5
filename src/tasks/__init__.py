"""Tasks: what a run predicts (`task=classification|multilabel|regression`); one registered module each."""

from src.registry import Registry
from src.tasks.base import Task

TASKS: Registry[Task] = Registry("task")

# Importing the modules registers them.
from src.tasks import classification, multilabel, regression  # noqa: E402,F401

__all__ = ["TASKS", "Task"]
