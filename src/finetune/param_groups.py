"""Optimizer parameter groups: one (or two, decay/no-decay) per backbone layer group, plus the head.

All groups exist from the first step, frozen ones included, so a freezing schedule only flips
`requires_grad` and the optimizer, the LR scheduler and checkpoints never change shape.
"""

from __future__ import annotations

from torch import nn

from src.backbones.base import LayerGroup


def layer_lrs(lr: float, n_groups: int, layer_decay: float = 1.0, head_lr_mult: float = 1.0) -> list[float]:
    """LR per backbone layer group (input -> output) followed by the head's LR.

    Group i gets ``lr * layer_decay ** (n_groups - i)``: the head is distance 0, the last backbone
    group distance 1, the embeddings/stem the farthest — discriminative LRs as in ULMFiT/BEiT.
    """
    return [lr * layer_decay ** (n_groups - i) for i in range(n_groups)] + [lr * head_lr_mult]


def _no_decay(name: str, p: nn.Parameter) -> bool:
    """Biases and normalisation scales (all 0/1-d tensors) are not weight-decayed."""
    return p.ndim <= 1


def param_groups(groups: list[LayerGroup], head: nn.Module, lrs: list[float], weight_decay: float) -> list[dict]:
    """Optimizer param-group dicts tagged with `layer_group` (index, head = len(groups)) and `name`."""
    named = [(g.name, g.named_parameters()) for g in groups] + [("head", list(head.named_parameters()))]
    if len(lrs) != len(named):
        raise ValueError(f"{len(lrs)} learning rates for {len(named)} layer groups (incl. head)")
    out = []
    for index, ((name, params), lr) in enumerate(zip(named, lrs, strict=True)):
        for no_decay in (False, True):
            chosen = [p for n, p in params if _no_decay(n, p) == no_decay]
            if chosen:
                wd = 0.0 if no_decay else weight_decay
                out.append({"params": chosen, "lr": lr, "weight_decay": wd, "name": name, "layer_group": index})
    return out
