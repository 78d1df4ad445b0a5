"""The backbone's weights as built (pretrained, before any training): the anchor of L2-SP and WiSE-FT."""

from __future__ import annotations

import torch
from torch import nn


class PretrainedReference:
    """Snapshot of every floating-point parameter and buffer, paired with the live tensor it was copied from.

    Pairs are kept by object, not by name, because LoRA's merge at test time renames the adapted weights
    (`query.base_layer.weight` -> `query.weight`) but keeps the very same Parameter objects; checkpoint loading,
    EMA swaps and device moves all update parameters in place, so the pairing holds for a run's whole life.
    Buffers (BatchNorm statistics) are re-bound on device moves, so they are paired by name instead.
    """

    def __init__(self, backbone: nn.Module) -> None:
        self.params = [(p, p.detach().clone()) for p in backbone.parameters()]
        self.buffers = {n: b.detach().clone() for n, b in backbone.named_buffers() if b.is_floating_point()}

    def param_pairs(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """(live, pretrained) pairs with the snapshot on the live tensor's device (moved once, then cached)."""
        self.params = [(p, p0 if p0.device == p.device else p0.to(p.device)) for p, p0 in self.params]
        return self.params

    @torch.no_grad()
    def interpolate(self, backbone: nn.Module, alpha: float) -> None:
        """Set the backbone to (1 - alpha) * pretrained + alpha * current, in place."""
        current = {id(p) for p in backbone.parameters()}
        for p, p0 in self.param_pairs():
            if id(p) in current:
                p.lerp_(p0, 1 - alpha)
        for name, b in backbone.named_buffers():
            if name in self.buffers:
                b.lerp_(self.buffers[name].to(b.device), 1 - alpha)
