"""The contract every backbone fulfils: features + ordered layer groups.

Layer groups are the unit that freezing schedules, discriminative learning rates and
pretrained-weight regularizers act on, so every backbone must declare them explicitly,
ordered from input to output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn


@dataclass
class LayerGroup:
    """A named, ordered slice of a backbone (e.g. ``embeddings``, ``encoder.layer.3``)."""

    name: str
    modules: list[nn.Module]

    def parameters(self) -> list[nn.Parameter]:
        seen: set[int] = set()
        params = []
        for module in self.modules:
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        out, seen = [], set()
        for module in self.modules:
            for name, p in module.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append((name, p))
        return out


@dataclass
class Preprocessing:
    """What a data module needs from the backbone to feed it."""

    modality: Literal["text", "image"]
    tokenizer: Any = None  # text: a Hugging Face tokenizer
    image_size: int | None = None  # image: square side length the backbone expects
    channels: int = 3
    mean: tuple[float, ...] = field(default=(0.485, 0.456, 0.406))
    std: tuple[float, ...] = field(default=(0.229, 0.224, 0.225))
    crop_pct: float = 1.0  # image: centre crop = this share of the shorter side (resized to image_size / crop_pct)
    min_image_size: int = 1  # image: smallest input side the backbone can take


State = torch.Tensor | dict[str, torch.Tensor]


class Backbone(nn.Module):
    """A pretrained (or randomly initialised) feature extractor.

    Subclasses set ``feature_dim`` and ``preprocessing`` and implement ``forward`` (batch dict ->
    ``(B, feature_dim)`` features) and ``layer_groups`` (input -> output, covering every parameter).

    The split API lets the feature cache store what the first ``cut`` layer groups compute and run only the rest:
    ``forward_from(cut, prefix_output(cut, batch)) == forward(batch)``. Every backbone supports the trivial cut
    after its last group (the state is the features); a backbone that can also stop and resume between groups
    lists those cuts in ``cuts()``. A text state is a dict holding ``hidden_states`` (B, L, H) and
    ``attention_mask`` (B, L), which the cache stores per sample without padding.
    """

    feature_dim: int
    preprocessing: Preprocessing
    # The classifier the weights were pretrained with, as (weight (Z, feature_dim), bias (Z,)) on the features; None
    # without one. Plain tensors, not parameters: never trained, in no layer group, not in the state dict. The
    # transferability scores NCE and LEEP read its predictions (src.rank).
    source_classifier: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def layer_groups(self) -> list[LayerGroup]:  # pragma: no cover - abstract
        raise NotImplementedError

    def cuts(self) -> set[int]:
        """Numbers of leading layer groups after which ``prefix_output``/``forward_from`` can split the forward
        (callers check a cut against this once, not on every batch)."""
        return {len(self.layer_groups())}

    def prefix_output(self, cut: int, batch: dict[str, torch.Tensor]) -> State:
        """What the first ``cut`` layer groups compute for ``batch``; after the last group, the features."""
        return self(batch)

    def forward_from(self, cut: int, state: State) -> torch.Tensor:
        """The features, from the output of the first ``cut`` layer groups; after the last group, the state."""
        return state


def check_depth_fits(depth: int, groups: list[LayerGroup]) -> None:
    """A `backbone.depth` beyond the backbone's layer groups names them, so the user sees what can be kept."""
    if depth > len(groups):
        names = ", ".join(g.name for g in groups)
        raise ValueError(f"depth: {depth} layer groups asked, but the backbone has {len(groups)}: {names}")
