"""Fine-tuning regularizers (`conf/regularization`): weight decay, label smoothing, head dropout, early stopping,
and the transfer-specific ones, each in its own module: L2-SP, EMA of the weights, mixup/cutmix, batch
augmentation (images, text) and WiSE-FT. The schema is in `config`; `build` (in `regularizers`) turns it into what
a run plugs in, and loads on first use so that validating a config stays torch-free.
"""

from importlib import import_module
from typing import Any

__all__ = ["Regularizers", "build"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(import_module("src.regularization.regularizers"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
