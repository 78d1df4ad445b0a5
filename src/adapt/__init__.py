"""Domain adaptation: a labelled source domain, an unlabelled target domain (`adapt=none|dann|cdan|coral|mcc|
entropy|oracle`), target evaluation and label-free model selection. Each option's schema is registered in
`src.adapt.config`; its module loads when built."""

from src.adapt.config import ADAPT, check_compatible

__all__ = ["ADAPT", "check_compatible"]
