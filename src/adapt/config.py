"""The adaptation methods' config schemas and the cross-group checks (torch-free: a config is validated before
any heavy import); each implementation module imports its schema from here."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from src.finetune.config import FINETUNE
from src.registry import Registry
from src.schema import check

ADAPT: Registry[Any] = Registry("adapt")
# criterion -> the per-epoch metric it maximises; "oracle" uses the target test labels.
CRITERIA = {"source_val": "val/acc", "im": "val/target_im", "snd": "val/target_snd", "oracle": "target/acc"}


@ADAPT.register("none", "src.adapt.base:Adapter")
@ADAPT.register("oracle", "src.adapt.methods:Oracle")
@dataclass
class AdaptConfig:
    """`none` and `oracle` have no knobs."""

    name: str = "none"


@ADAPT.register("coral", "src.adapt.methods:Coral")
@ADAPT.register("entropy", "src.adapt.methods:EntropyMinimization")
@dataclass
class WeightedConfig(AdaptConfig):
    """Fields every adaptation method has. The loss weight is `weight * ramp(p)`, p = training progress in [0, 1]."""

    weight: float = 1.0  # trade-off of the adaptation loss against the source cross-entropy
    ramp: bool = True  # ramp the weight (adversarial methods: the gradient reversal) up as 2/(1+exp(-10p)) - 1

    def __post_init__(self) -> None:
        check(self.weight >= 0 and math.isfinite(self.weight), f"weight: must be >= 0; got {self.weight}")


def check_compatible(adapt: Any, data: Any, finetune: Any, monitor: str) -> None:
    """Cross-group checks before any compute: adaptation and the target scores need a target domain, and feature
    alignment needs backbone features that train."""
    if monitor.startswith("val/target_") and not data.has_target:
        raise ValueError(
            f"objective.metric={monitor} is a target-domain score, but data '{data.name}' has no target domain"
        )
    if adapt.name == "none":
        return
    if not data.has_target:
        raise ValueError(
            f"adapt={adapt.name} needs a target domain, but data '{data.name}' has none; set data.target_shift "
            "(digits: invert | rotate | noise), data.target_path (text_table) or data.target_dir (image_folder)"
        )
    strategy = FINETUNE.factory(finetune.name)  # imports the implementations: only with adapt != none
    features_train = strategy.trains_backbone or not strategy.frozen_groups_fixed  # LoRA: adapters inside groups
    if ADAPT.factory(adapt.name).aligns_features and not features_train:
        raise ValueError(
            f"adapt={adapt.name} aligns backbone features, but finetune={finetune.name} never trains the backbone "
            "(feature alignment cannot change frozen features); use finetune=full/partial/gradual_unfreeze/lp_ft/"
            "lora, or a method on the predictions: adapt=mcc or adapt=entropy"
        )


@ADAPT.register("dann", "src.adapt.methods:DANN")
@ADAPT.register("cdan", "src.adapt.methods:CDAN")
@dataclass
class AdversarialConfig(WeightedConfig):
    hidden: int = 1024  # width of the discriminator's two hidden layers
    randomized_dim: int = 1024  # CDAN: random multilinear map to this size when features x classes exceeds 4096

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.hidden >= 1, f"hidden: must be >= 1; got {self.hidden}")
        check(self.randomized_dim >= 1, f"randomized_dim: must be >= 1; got {self.randomized_dim}")


@ADAPT.register("mcc", "src.adapt.methods:MCC")
@dataclass
class MCCConfig(WeightedConfig):
    temperature: float = 2.5  # softens the target predictions before the class-confusion matrix

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.temperature > 0, f"temperature: must be > 0; got {self.temperature}")
