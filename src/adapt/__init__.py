"""Domain adaptation: a labelled source domain, an unlabelled target domain (`adapt=none|dann|cdan|coral|mcc|
entropy|oracle`), target evaluation and label-free model selection."""

# Importing the modules registers them.
from src.adapt import methods  # noqa: E402,F401,I001
from src.adapt.base import ADAPT, AdaptConfig, Adapter, check_compatible
from src.adapt.selection import TargetEvaluation

__all__ = ["ADAPT", "AdaptConfig", "Adapter", "TargetEvaluation", "check_compatible"]
