"""A small conv net pretrained in seconds on scikit-learn's digits: the offline default backbone and CPU test bed.

Pretraining on the source digit classes is real (a plain torch loop with a temporary linear head), so transfer to
the other digits is measurable. The result is cached on disk under a hash of everything that determines it, so a
sweep pays for it once; the file is written atomically so parallel workers can race to create it safely.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from src.backbones.base import Backbone, LayerGroup, Preprocessing, check_depth_fits
from src.backbones.config import SmallCNNConfig
from src.backbones.groups import check_partition, module_layer_groups
from src.cache import Cache, fingerprint

log = logging.getLogger(__name__)

# The rest of the pretraining recipe; part of the cache key, so changing it invalidates cached weights.
RECIPE = {"lr": 3e-3, "batch_size": 64, "val_fraction": 0.2}
ENTRY_FORMAT = 2  # 2: the entry also holds the source head (NCE/LEEP read it); part of the key


def conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


class SmallCNN(Backbone):
    """``stem`` (stride 1) then one stride-2 conv-bn-relu ``block`` per further width; global average pooling,
    so any input size works. Layer groups: ``stem``, ``block.0`` ... ``block.{len(channels)-2}``.
    """

    def __init__(self, in_channels: int, channels: list[int], image_size: int) -> None:
        super().__init__()
        self.stem = conv_bn_relu(in_channels, channels[0], stride=1)
        self.block = nn.ModuleList(conv_bn_relu(a, b, stride=2) for a, b in itertools.pairwise(channels))
        self.feature_dim = channels[-1]
        self.preprocessing = Preprocessing(
            modality="image",
            image_size=image_size,
            channels=in_channels,
            mean=(0.5,) * in_channels,
            std=(0.5,) * in_channels,
        )
        # Set when the weights come from digits pretraining: source accuracy, cache path, whether it was cached.
        self.pretrain_info: dict[str, Any] | None = None

    def truncate(self, depth: int) -> None:
        """Keep the first `depth` layer groups (stem, then blocks): the features are the last kept one's, pooled."""
        check_depth_fits(depth, self.layer_groups())
        self.block = self.block[: depth - 1]
        self.feature_dim = self._stages()[-1][0].out_channels

    def _stages(self) -> list[nn.Module]:
        return [self.stem, *self.block]  # = the layer groups, in order

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.forward_from(0, batch["pixel_values"])

    def layer_groups(self) -> list[LayerGroup]:
        return module_layer_groups(self)

    def cuts(self) -> set[int]:
        return set(range(1, len(self._stages()) + 1))

    def prefix_output(self, cut: int, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The feature map after the first ``cut`` stages (pooled features after the last)."""
        x = batch["pixel_values"]
        for stage in self._stages()[:cut]:
            x = stage(x)
        return x.mean(dim=(2, 3)) if cut == len(self._stages()) else x

    def forward_from(self, cut: int, state: torch.Tensor) -> torch.Tensor:
        stages = self._stages()
        if cut == len(stages):
            return state
        for stage in stages[cut:]:
            state = stage(state)
        return state.mean(dim=(2, 3))


def _settings(cfg: SmallCNNConfig) -> dict[str, Any]:
    """Everything that determines the pretrained weights (the cache key)."""
    keep = ("in_channels", "channels", "image_size", "pretrain", "pretrain_classes", "pretrain_epochs", "pretrain_seed")
    return {**{k: v for k, v in asdict(cfg).items() if k in keep}, "recipe": RECIPE, "format": ENTRY_FORMAT}


def weights_cache(cfg: SmallCNNConfig) -> tuple[Cache, str]:
    """The shared on-disk cache (`src.cache`) and the key of these pretrained weights."""
    return Cache("small_cnn", cfg.cache_dir), f"{cfg.pretrain}-{fingerprint(_settings(cfg))}"


def _source_data(net: SmallCNN, classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Source digits through the digits data module's own transform, so pretraining sees what fine-tuning will."""
    from src.data.digits import digits_arrays, digits_transform  # lazy: only pretraining needs the data package

    images, labels = digits_arrays()
    keep = torch.isin(labels, torch.tensor(classes))
    transform = digits_transform(net.preprocessing)
    index_of = torch.full((10,), -1, dtype=torch.long)
    index_of[torch.tensor(classes)] = torch.arange(len(classes))
    return torch.stack([transform(image) for image in images[keep]]), index_of[labels[keep]]


def pretrain_on_digits(net: SmallCNN, cfg: SmallCNNConfig) -> tuple[float, nn.Linear]:
    """Train ``net`` + a linear head on the source classes; return held-out source accuracy and the head.

    Uses the global torch RNG, so the caller seeds it (and forks it, to leave the experiment's stream alone).
    """
    x, y = _source_data(net, cfg.pretrain_classes)
    order = torch.randperm(len(y))
    n_val = int(len(y) * RECIPE["val_fraction"])
    val, train = order[:n_val], order[n_val:]
    head = nn.Linear(net.feature_dim, len(cfg.pretrain_classes))
    optimizer = torch.optim.Adam([*net.parameters(), *head.parameters()], lr=RECIPE["lr"])
    net.train()
    for _ in range(cfg.pretrain_epochs):
        for idx in train[torch.randperm(len(train))].split(RECIPE["batch_size"]):
            loss = F.cross_entropy(head(net({"pixel_values": x[idx]})), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.eval()
    with torch.no_grad():
        accuracy = (head(net({"pixel_values": x[val]})).argmax(dim=1) == y[val]).float().mean().item()
    net.train()
    return accuracy, head


def _load_or_pretrain(net: SmallCNN, cfg: SmallCNNConfig) -> dict[str, Any]:
    cache, key = weights_cache(cfg)

    def pretrain() -> dict[str, Any]:
        start = time.perf_counter()
        accuracy, head = pretrain_on_digits(net, cfg)
        log.info(
            "small_cnn: trained on digits %s for %d epochs in %.1fs, held-out source accuracy %.3f",
            *(cfg.pretrain_classes, cfg.pretrain_epochs, time.perf_counter() - start, accuracy),
        )
        return {"state_dict": net.state_dict(), "source_accuracy": accuracy, "head": head.state_dict()}

    state = cache.get_or_compute(key, pretrain)
    net.load_state_dict(state["state_dict"])
    net.source_classifier = (state["head"]["weight"], state["head"]["bias"])
    from_cache = cache.stats.hits > 0
    if from_cache:
        log.info("small_cnn: loaded %s-pretrained weights from cache %s", cfg.pretrain, cache.dir / key)
    return {
        "source_accuracy": state["source_accuracy"],
        "cache_path": str(cache.dir / f"{key}.pt"),
        "from_cache": from_cache,
    }


def build_small_cnn(cfg: SmallCNNConfig, pretrained: bool = True) -> SmallCNN:
    """Digits-pretrained weights (cached), or random init when ``pretrained=False`` or ``pretrain`` is null; the
    first ``depth`` layer groups of it when set (the source head then no longer applies)."""
    if not (pretrained and cfg.pretrain):
        net = SmallCNN(cfg.in_channels, cfg.channels, cfg.image_size)
    else:
        # Seeded and forked: identical weights whether trained or loaded, and the caller's RNG stream is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.pretrain_seed)
            net = SmallCNN(cfg.in_channels, cfg.channels, cfg.image_size)
            net.pretrain_info = _load_or_pretrain(net, cfg)
    if cfg.depth is not None:
        net.truncate(cfg.depth)
        net.source_classifier = None
    check_partition(net, net.layer_groups())
    return net
