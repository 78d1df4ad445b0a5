"""Layer-group discovery: one structural rule for every model, plus a check that groups partition it.

A backbone's repeated blocks live in one ``nn.ModuleList`` (BERT ``encoder.layer``, ViT ``layers``, HF ResNet and
ConvNeXt ``encoder.stages``, the small CNN's ``block``). Taking the ModuleList holding the most parameters and
splitting it into one group per element, with every other top-level child as its own group, yields the precise
family groups (``embeddings``, ``encoder.layer.0`` ... ``encoder.layer.N-1``, ``pooler``; ``embedder``,
``encoder.stages.i``; ...) *and* a sensible fallback for unknown models, without a per-family name table that
breaks when a library renames an attribute (transformers 5 moved ViT's blocks from ``encoder.layer`` to
``layers``).
"""

from __future__ import annotations

from torch import nn

from src.backbones.base import LayerGroup


class ParameterHolder(nn.Module):
    """Parameters owned by another module, gathered so a ``LayerGroup`` can hold loose ones (e.g. a cls token).

    It only references the parameters (same objects), so freezing and optimizer groups act on the model's own.
    """

    def __init__(self, named: list[tuple[str, nn.Parameter]]) -> None:
        super().__init__()
        for name, param in named:
            self.register_parameter(name.replace(".", "__"), param)


def block_list_path(model: nn.Module) -> str | None:
    """Dotted path of the ``nn.ModuleList`` holding the most parameters (the repeated blocks), if any."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            count = sum(p.numel() for p in module.parameters())
            if count > best_count:
                best, best_count = name, count
    return best


def module_layer_groups(model: nn.Module) -> list[LayerGroup]:
    """Children of ``model`` in registration (= forward) order, the block list expanded one group per block.

    Parent modules of the block list are expanded too, so siblings such as an encoder's final norm get their
    own group in place; parameters held directly by an expanded module form a group named after it. Modules
    without parameters are skipped: an empty group would only add a useless optimizer parameter group.
    """
    blocks = block_list_path(model)
    groups: list[LayerGroup] = []

    def visit(module: nn.Module, prefix: str) -> None:
        direct = list(module.named_parameters(recurse=False))
        if direct:
            groups.append(LayerGroup(prefix or "params", [ParameterHolder(direct)]))
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if blocks is not None and (blocks == path or blocks.startswith(path + ".")):
                visit(child, path)
            elif any(True for _ in child.parameters()):
                groups.append(LayerGroup(path, [child]))

    visit(model, "")
    return groups


def check_partition(model: nn.Module, groups: list[LayerGroup]) -> None:
    """Raise ``ValueError`` unless the groups hold every parameter of ``model`` exactly once, under unique names.

    Run at build time so a wrong grouping fails before training rather than silently skipping a layer in a
    freezing schedule or training one twice in the optimizer.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    owner: dict[int, str] = {}
    seen_names: set[str] = set()
    for group in groups:
        if group.name in seen_names:
            raise ValueError(f"layer group name '{group.name}' is used twice")
        seen_names.add(group.name)
        for p in group.parameters():
            if id(p) not in names:
                raise ValueError(f"layer group '{group.name}' holds a parameter that is not in the model")
            if id(p) in owner:
                raise ValueError(f"parameter '{names[id(p)]}' is in layer groups '{owner[id(p)]}' and '{group.name}'")
            owner[id(p)] = group.name
    missing = [n for i, n in names.items() if i not in owner]
    if missing:
        raise ValueError(f"{len(missing)} parameters are in no layer group, e.g. {missing[:3]}")
