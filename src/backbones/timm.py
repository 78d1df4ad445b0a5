"""Optional: any timm image model as a backbone (``pip install -e '.[timm]'``; not in the base install).

timm is imported only inside the factory, so the registry (and ``conf/backbone/timm.yaml``) exists without it.
Untested here: timm must not be installed next to transformers in this environment.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from src.backbones.base import Backbone, LayerGroup, Preprocessing
from src.backbones.config import TimmConfig
from src.backbones.groups import ParameterHolder, check_partition, module_layer_groups


class TimmBackbone(Backbone):
    """A timm model without its classifier (``num_classes=0``): forward returns its pooled features."""

    def __init__(self, model: nn.Module, preprocessing: Preprocessing) -> None:
        super().__init__()
        self.model = model
        self.preprocessing = preprocessing
        self.feature_dim = model.num_features

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(batch["pixel_values"])

    def layer_groups(self) -> list[LayerGroup]:
        """timm's own fine-grained ``group_matcher`` where the model has one, else the structural rule."""
        if not hasattr(self.model, "group_matcher"):
            return module_layer_groups(self.model)
        from timm.models import group_parameters

        named = dict(self.model.named_parameters())
        groups = group_parameters(self.model, self.model.group_matcher(coarse=False))
        return [
            LayerGroup(f"group.{i}", [ParameterHolder([(n, named[n]) for n in names])])
            for i, names in enumerate(groups.values())
        ]


def build_timm(cfg: TimmConfig, pretrained: bool = True) -> TimmBackbone:
    try:
        import timm
        from timm.data import resolve_model_data_config
    except ImportError as e:
        raise ImportError("timm backbones need the optional extra: pip install -e '.[timm]'") from e
    try:
        model = timm.create_model(cfg.model, pretrained=pretrained, num_classes=0)
    except (OSError, RuntimeError) as e:
        raise OSError(
            f"could not create timm model '{cfg.model}' (pretrained={pretrained}): {e}\n"
            "Pretrained timm weights come from the Hugging Face hub: allow network access or pre-fill its cache."
        ) from e
    data: dict[str, Any] = resolve_model_data_config(model)
    channels, size, _ = data["input_size"]
    preprocessing = Preprocessing(
        modality="image", image_size=size, channels=channels, mean=tuple(data["mean"]), std=tuple(data["std"])
    )
    backbone = TimmBackbone(model, preprocessing)
    check_partition(backbone, backbone.layer_groups())
    return backbone
