"""What batch-norm layers inside FROZEN layer groups do — libraries disagree, so it is three explicit knobs.

`requires_grad=False` alone leaves a BN layer half-frozen: its running statistics still move with every
training batch (PyTorch's default), so the "frozen" features drift. The policy (recorded with the config):

- ``eval_mode``: the layer runs in eval mode while training — it normalises with its running statistics and
  never updates them (fastai's ``BnFreeze``, Keras' frozen ``BatchNormalization``). Frozen features are then
  exactly the pretrained ones, in training and evaluation alike.
- ``update_stats`` (only without ``eval_mode``): normalise with batch statistics (train mode) and keep updating
  the running statistics (PyTorch's default), or not (running statistics stay the pretrained ones; evaluation
  uses them).
- ``train_affine``: the layer's scale/shift (gamma, beta) keep training although their group is frozen (fastai's
  ``train_bn=True``; "Training BatchNorm and only BatchNorm", Frankle et al. 2021).

BN layers in trainable groups are left as PyTorch has them (train mode, statistics updated, affine trained).
"""

from __future__ import annotations

from collections.abc import Iterator

from torch.nn.modules.batchnorm import _BatchNorm

from src.backbones.base import LayerGroup
from src.finetune.config import BatchNormPolicy


def batch_norms(group: LayerGroup) -> Iterator[_BatchNorm]:
    """The BN layers (any dimension, SyncBatchNorm included) inside a layer group's modules."""
    for module in group.modules:
        for m in module.modules():
            if isinstance(m, _BatchNorm):
                yield m


def _has_stats(bn: _BatchNorm) -> bool:
    return bn.running_mean is not None


def apply_bn_policy(
    groups: list[LayerGroup], trainable: set[int], policy: BatchNormPolicy, training: bool
) -> list[_BatchNorm]:
    """Set mode, statistics tracking and affine `requires_grad` of every BN layer from the frozen set.

    Run after `requires_grad` of the groups was set; idempotent. Returns the layers held in eval mode, for
    `hold_eval` to re-apply after Lightning put the module back into train mode.
    """
    held: list[_BatchNorm] = []  # with statistics, in frozen groups, under `policy.eval_mode`
    for i, group in enumerate(groups):
        frozen = i not in trainable
        for bn in batch_norms(group):
            if frozen and policy.train_affine:
                for p in bn.parameters(recurse=False):
                    p.requires_grad_(True)
            if _has_stats(bn):
                # track_running_stats=False in train mode: batch statistics, buffers untouched; eval still uses them.
                bn.track_running_stats = not frozen or policy.update_stats
                bn.train(training)
                if frozen and policy.eval_mode:
                    held.append(bn)
    if training:
        hold_eval(held)
    return held


def hold_eval(bns: list[_BatchNorm]) -> None:
    """Put them back in eval mode: cheap enough for every training batch (Lightning restores train mode after
    validation, possibly mid-epoch)."""
    for bn in bns:
        bn.train(False)
