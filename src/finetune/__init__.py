"""Fine-tuning strategies: which layer groups train at which epoch, and how the backbone is initialised. Each
option's schema is registered in `src.finetune.config`; its module loads when built."""

from src.finetune.config import FINETUNE

__all__ = ["FINETUNE"]
