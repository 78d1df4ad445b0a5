"""LoRA (Hu et al. 2021) through `peft`: low-rank adapters in the backbone, base weights frozen, head trained.

Adapters are injected in place (`peft.inject_adapter_in_model`), so the layer groups still cover every parameter
(the adapters live inside the groups' modules) and the optimizer gets them in their layer group's LR group. At
test start the adapters are merged into the base weights and removed, so the test and the logged checkpoint use
a plain backbone of the original architecture (loadable with `finetune.init_from`).
"""

from __future__ import annotations

import logging

import lightning.pytorch as pl
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from src.backbones.base import Backbone
from src.backbones.groups import check_partition
from src.finetune.bn import BatchNormPolicy, apply_bn_policy, hold_eval
from src.finetune.config import LoraFinetuneConfig
from src.finetune.strategy import Strategy, count_trainable

log = logging.getLogger(__name__)

# Attention projections by family, tried in order: BERT-like and ViT (HF), Llama/CLIP-like, DistilBERT.
ATTENTION_TARGETS = (("query", "value"), ("q_proj", "v_proj"), ("q_lin", "v_lin"))


def default_targets(backbone: nn.Module) -> list[str]:
    """Attention query/value projections when the backbone has them, else every Conv2d/Linear by full name."""
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in backbone.named_modules()}
    for pair in ATTENTION_TARGETS:
        if set(pair) <= leaf_names:
            return list(pair)
    layers = [name for name, m in backbone.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not layers:
        raise ValueError(
            "finetune.target_modules: the backbone has no attention query/value projections and no Conv2d/Linear "
            "layers; list the module names to adapt explicitly"
        )
    return layers


def merge_adapters(model: nn.Module) -> int:
    """Fold every LoRA adapter into its base layer and put the base layer back in its place; returns the count.

    The base layers' Parameter objects are kept (updated in place), so anything holding them stays valid.
    """
    adapted = [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in adapted:
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.get_base_layer())
    return len(adapted)


def set_lora_trainable(backbone: nn.Module) -> None:
    for name, p in backbone.named_parameters():
        p.requires_grad_("lora_" in name)


class LoraSchedule(pl.Callback):
    """Only adapters train in the backbone (the head always trains): every layer group counts as frozen, so the
    `bn` policy applies to all batch-norm layers (by default they stay exactly pretrained, statistics included).
    Adapters are merged into the base weights when testing starts.
    """

    def __init__(self, bn: BatchNormPolicy) -> None:
        self.bn = bn
        self.eval_bns: list[nn.Module] = []

    def _freeze(self, pl_module: pl.LightningModule) -> None:
        set_lora_trainable(pl_module.backbone)
        self.eval_bns = apply_bn_policy(pl_module.backbone.layer_groups(), set(), self.bn, pl_module.training)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._freeze(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = sum(p.numel() for p in pl_module.parameters())
        trainable = count_trainable(pl_module)
        log.info("lora: %d of %d parameters trainable (%.2f%%)", trainable, total, 100 * trainable / total)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._freeze(pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: object, i: int) -> None:
        hold_eval(self.eval_bns)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if merged := merge_adapters(pl_module.backbone):
            log.info("lora: merged %d adapters into the base weights", merged)


class Lora(Strategy):
    """Base weights frozen (bit-identical after training), LoRA adapters + the new head train."""

    cfg: LoraFinetuneConfig
    frozen_groups_fixed = False  # adapters train inside every group: nothing to cache
    trains_backbone = False  # whole groups stay frozen; the adapters inside them train

    def prepare(self, backbone: Backbone) -> Backbone:
        targets = self.cfg.target_modules or default_targets(backbone)
        config = LoraConfig(
            r=self.cfg.r, lora_alpha=self.cfg.alpha, lora_dropout=self.cfg.dropout, target_modules=targets
        )
        inject_adapter_in_model(config, backbone)
        check_partition(backbone, backbone.layer_groups())
        set_lora_trainable(backbone)
        log.info("lora: r=%d adapters on %s", self.cfg.r, targets)
        return backbone

    def trainable_groups(self, epoch: int, n_groups: int) -> set[int]:
        return set()  # no whole group trains; the adapters inside them do (LoraSchedule)

    def callbacks(self) -> list[pl.Callback]:
        return [LoraSchedule(self.cfg.bn)]
