"""Fine-tuning strategies: which layer groups train at which epoch, and how the backbone is initialised."""

# Importing the modules registers them.
from src.finetune import distill, lora, schedules, strategies  # noqa: E402,F401,I001
from src.finetune.strategy import FINETUNE, Strategy

__all__ = ["FINETUNE", "Strategy"]
