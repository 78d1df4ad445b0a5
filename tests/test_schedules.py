"""Freezing schedules on real Lightning fits: at every epoch boundary exactly the expected layer groups train,
frozen ones stay bit-identical (BN statistics included) and get no gradient, unfrozen ones move; resuming from a
mid-schedule checkpoint restores the same frozen set and LRs; DDP keeps unfrozen groups in sync."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from src.finetune import FINETUNE
from src.optim import OptimConfig
from src.schema import ConfigError
from tests.test_freeze import build, trainer

EPOCHS = 4
# small_cnn has 3 layer groups: stem (0), block.0 (1), block.1 (2); the head always trains.
SCHEDULES = {
    "partial": ({"name": "partial", "k": 1}, [{1, 2}] * EPOCHS),
    "gradual_unfreeze": ({"name": "gradual_unfreeze"}, [set(), {2}, {1, 2}, {0, 1, 2}]),
    "gradual_unfreeze_2x2": (
        {"name": "gradual_unfreeze", "every_n_epochs": 2, "groups_per_step": 2},
        [set(), set(), {1, 2}, {1, 2}],
    ),
    "milestones": (
        {"name": "milestones", "milestones": [{"epoch": 0, "unfreeze": ["stem"]}, {"epoch": 2, "unfreeze": 1}]},
        [{0}, {0}, {0, 2}, {0, 2}],
    ),
    "lp_ft": ({"name": "lp_ft", "probe_epochs": 2, "ft_lr_scale": 0.5}, [set(), set(), {0, 1, 2}, {0, 1, 2}]),
    "linear_probe": ({"name": "linear_probe"}, [set()] * EPOCHS),
}


class EpochRecorder(pl.Callback):
    """After the strategy's callbacks at each epoch start: which groups require grad, every group's state, the LRs;
    at each epoch end: the state again and which parameters hold a gradient."""

    def __init__(self) -> None:
        self.trainable: list[set[int]] = []
        self.lrs: list[dict[int, float]] = []
        self.start: list[list[dict[str, torch.Tensor]]] = []
        self.end: list[list[dict[str, torch.Tensor]]] = []
        self.with_grad: list[set[int]] = []

    @staticmethod
    def _states(pl_module: pl.LightningModule) -> list[dict[str, torch.Tensor]]:
        return [
            {k: v.detach().clone() for m in g.modules for k, v in m.state_dict(keep_vars=True).items()}
            for g in pl_module.backbone.layer_groups()
        ]

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        groups = pl_module.backbone.layer_groups()
        flags = [{p.requires_grad for p in g.parameters()} for g in groups]
        assert all(len(f) == 1 for f in flags), f"a group is partly frozen: {flags}"
        self.trainable.append({i for i, f in enumerate(flags) if f == {True}})
        self.lrs.append({g["layer_group"]: g["lr"] for g in trainer.optimizers[0].param_groups})
        self.start.append(self._states(pl_module))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.end.append(self._states(pl_module))
        groups = pl_module.backbone.layer_groups()
        self.with_grad.append({i for i, g in enumerate(groups) if any(p.grad is not None for p in g.parameters())})


def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedule_at_every_epoch_boundary(name: str) -> None:
    finetune, expected = SCHEDULES[name]
    strategy, module, dm = build(finetune)
    rec = EpochRecorder()
    trainer([*strategy.callbacks(), rec], max_epochs=EPOCHS).fit(module, datamodule=dm)
    assert rec.trainable == expected
    for epoch, trainable in enumerate(expected):
        for i, (start, end) in enumerate(zip(rec.start[epoch], rec.end[epoch], strict=True)):
            assert changed(start, end) == (i in trainable), f"epoch {epoch} group {i}"
        assert rec.with_grad[epoch] <= trainable, f"epoch {epoch}: frozen groups got gradients"


def test_lp_ft_scales_lrs_within_the_schedule() -> None:
    """While probing the head's LR is probe_lr_scale times its own; from the first fine-tuning epoch the backbone
    LRs are ft_lr_scale times theirs (layer decay kept). Constant scheduler: the schedule factor is exactly 1."""
    optim = OptimConfig(lr=1e-2, layer_decay=0.5, scheduler="constant")
    finetune = {"name": "lp_ft", "probe_epochs": 1, "probe_lr_scale": 10.0, "ft_lr_scale": 0.1}
    strategy, module, dm = build(finetune, optim)
    rec = EpochRecorder()
    trainer([*strategy.callbacks(), rec], max_epochs=3).fit(module, datamodule=dm)
    for epoch, lrs in enumerate(rec.lrs):
        head, backbone = (10.0, 1.0) if epoch == 0 else (1.0, 0.1)
        assert lrs[3] == pytest.approx(1e-2 * head)
        assert [lrs[i] for i in range(3)] == pytest.approx([1e-2 * 0.5 ** (3 - i) * backbone for i in range(3)])


class StepLrs(pl.Callback):
    """The head's LR at every training step."""

    def __init__(self) -> None:
        self.head: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: object, idx: int) -> None:
        self.head.append(trainer.optimizers[0].param_groups[-1]["lr"])


@pytest.mark.parametrize("restart", [True, False])
def test_lp_ft_restarts_the_schedule_when_fine_tuning_begins(restart: bool) -> None:
    """With `restart_schedule`, the probe epoch and the fine-tuning epochs each run a whole warmup + linear decay
    (the head's LR at a phase's first step is its warmup start); without, one schedule spans the fit."""
    optim = OptimConfig(lr=1e-2, scheduler="linear", warmup_ratio=0.25)
    finetune = {"name": "lp_ft", "probe_epochs": 1, "probe_lr_scale": 1.0, "ft_lr_scale": 1.0}
    strategy, module, dm = build({**finetune, "restart_schedule": restart}, optim, batch_size=4)
    rec = StepLrs()
    trainer([*strategy.callbacks(), rec], max_epochs=3).fit(module, datamodule=dm)
    per_epoch = len(rec.head) // 3
    phases = [rec.head[:per_epoch], rec.head[per_epoch:]] if restart else [rec.head]
    for lrs in phases:
        warmup = int(len(lrs) * 0.25)
        assert lrs[0] == pytest.approx(1e-2 / warmup)
        assert max(lrs) == pytest.approx(1e-2)
        assert lrs[-1] == pytest.approx(1e-2 / (len(lrs) - warmup))  # the last step before the decay reaches 0


class HeadAtStart(pl.Callback):
    """The head's final linear layer when training starts (after the strategy's callbacks)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        linear = pl_module.head[-1]
        self.weight, self.bias = linear.weight.detach().clone(), linear.bias.detach().clone()


def test_lp_ft_probe_fit_sets_the_head_to_the_logistic_regression_optimum() -> None:
    """`probe_fit`: before any step the head is the (unique, l2 > 0) optimum of the penalised logistic loss on the
    eval-mode features of the whole training set: the objective's gradient vanishes there."""
    # probe_epochs=1 keeps the backbone (and its BN statistics) frozen in the one step taken: same features after
    strategy, module, dm = build({"name": "lp_ft", "probe_fit": True, "probe_epochs": 1, "probe_l2": 1e-3})
    rec = HeadAtStart()
    trainer([*strategy.callbacks(), rec], max_steps=1).fit(module, datamodule=dm)
    module.eval()
    with torch.no_grad():
        batches = list(dm.train_dataloader())
        x = torch.cat([module.backbone(b) for b in batches]).double()
        y = torch.cat([b["labels"] for b in batches])
    weight = rec.weight.double().requires_grad_()
    bias = rec.bias.double().requires_grad_()
    loss = torch.nn.functional.cross_entropy(x @ weight.T + bias, y) + 1e-3 * weight.pow(2).sum()
    loss.backward()
    assert weight.grad.abs().max() < 1e-4 and bias.grad.abs().max() < 1e-4
    assert ((x @ weight.T + bias).argmax(-1) == y).float().mean() > 0.5  # 5 classes: far above chance


def test_linear_probe_fit_is_the_optimum_after_its_epoch_and_refuses_more() -> None:
    """`finetune=linear_probe probe_fit=true`: fitted once, then the epoch's steps (LR 0) leave it where it is."""
    strategy, module, dm = build({"name": "linear_probe", "probe_fit": True, "probe_l2": 1e-3})
    rec = HeadAtStart()
    trainer([*strategy.callbacks(), rec], max_epochs=1).fit(module, datamodule=dm)
    linear = module.head[-1]
    assert torch.equal(linear.weight, rec.weight) and torch.equal(linear.bias, rec.bias)
    module.eval()
    with torch.no_grad():
        batches = list(dm.train_dataloader())
        x = torch.cat([module.backbone(b) for b in batches]).double()
        y = torch.cat([b["labels"] for b in batches])
    weight = linear.weight.detach().double().requires_grad_()
    bias = linear.bias.detach().double().requires_grad_()
    (torch.nn.functional.cross_entropy(x @ weight.T + bias, y) + 1e-3 * weight.pow(2).sum()).backward()
    assert weight.grad.abs().max() < 1e-4 and bias.grad.abs().max() < 1e-4
    with pytest.raises(ConfigError, match="set trainer.max_epochs=1"):
        strategy.check(3, 2)


def test_milestones_reject_unknown_group_names() -> None:
    with pytest.raises(ValueError, match="unknown layer groups"):
        build({"name": "milestones", "milestones": [{"epoch": 1, "unfreeze": ["block.7"]}]})


def test_partial_k_beyond_the_backbone_fails() -> None:
    strategy = FINETUNE.build({"name": "partial", "k": 4})
    with pytest.raises(ValueError, match="only 3 layer groups"):
        strategy.trainable_groups(0, 3)


class StopAfter(pl.Callback):
    """An interruption: stop once `epoch` is done (its last.ckpt is written), keeping max_epochs (and the schedule)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


@pytest.mark.parametrize(
    "finetune", [{"name": "gradual_unfreeze"}, {"name": "lp_ft", "probe_epochs": 1, "ft_lr_scale": 0.1}]
)
def test_resume_mid_schedule_restores_frozen_set_and_lrs(finetune: dict, tmp_path: Path) -> None:
    """Interrupt after epoch 1, resume from last.ckpt: epochs 2-3 have the trainable sets and LRs of an
    uninterrupted run (the checkpoint holds LP-FT's already-scaled base LRs: re-applying must not scale twice)."""
    optim = OptimConfig(lr=1e-2, layer_decay=0.5, warmup_ratio=0.25)

    def fit(extra: list[pl.Callback], ckpt_path: str | None = None, name: str = "") -> EpochRecorder:
        strategy, module, dm = build(finetune, optim)
        rec = EpochRecorder()
        checkpoint = ModelCheckpoint(dirpath=tmp_path / name, save_last=True, save_top_k=0)
        run = trainer([*strategy.callbacks(), rec, checkpoint, *extra], max_epochs=EPOCHS, enable_checkpointing=True)
        run.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        return rec

    uninterrupted = fit([], name="uninterrupted")
    interrupted = fit([StopAfter(1)], name="interrupted")
    resumed = fit([], ckpt_path=str(tmp_path / "interrupted" / "last.ckpt"), name="resumed")
    assert len(interrupted.trainable) == 2 and len(resumed.trainable) == 2
    assert interrupted.trainable + resumed.trainable == uninterrupted.trainable
    for got, want in zip(resumed.lrs, uninterrupted.lrs[2:], strict=True):
        assert got == pytest.approx(want, rel=1e-12)
    for epoch, trainable in enumerate(resumed.trainable):
        for i, (start, end) in enumerate(zip(resumed.start[epoch], resumed.end[epoch], strict=True)):
            assert changed(start, end) == (i in trainable)


class SaveState(pl.Callback):
    """Each DDP rank writes its final weights, so the test can compare the replicas."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, self.folder / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_unfreezing_keeps_replicas_in_sync(tmp_path: Path) -> None:
    """Lightning #20340: under DDP a group unfrozen mid-run must still be all-reduced. Two CPU ranks (gloo) see
    different batches; after gradual unfreezing their weights must be identical, the never-unfrozen stem untouched."""
    strategy, module, dm = build({"name": "gradual_unfreeze"}, batch_size=8)
    init = {k: v.detach().clone() for k, v in module.state_dict().items()}
    callbacks = [*strategy.callbacks(), SaveState(tmp_path)]
    run = trainer(callbacks, max_epochs=3, devices=2, strategy="ddp_spawn_find_unused_parameters_true")
    run.fit(module, datamodule=dm)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    # Parameters must agree exactly; BN buffers are broadcast from rank 0 before each forward, then updated locally.
    params = [k for k, _ in module.named_parameters()]
    diverged = [k for k in params if not torch.equal(rank0[k], rank1[k])]
    assert not diverged, f"DDP replicas diverged: {diverged}"
    stem = [k for k in init if k.startswith("backbone.stem.")]
    trained = [k for k in init if k.startswith(("backbone.block.", "head.")) and "num_batches" not in k]
    assert all(torch.equal(rank0[k], init[k]) for k in stem)
    assert all(not torch.equal(rank0[k], init[k]) for k in trained)


@pytest.mark.slow
def test_ddp_without_find_unused_parameters_is_refused(tmp_path: Path) -> None:
    strategy, module, dm = build({"name": "gradual_unfreeze"}, batch_size=8)
    run = trainer(strategy.callbacks(), max_epochs=2, devices=2, strategy="ddp_spawn")
    with pytest.raises(Exception, match="find_unused_parameters=True"):
        run.fit(module, datamodule=dm)


class SaveHeadAtStart(pl.Callback):
    """Each DDP rank writes its head as training starts (after the strategy's callbacks)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.save(pl_module.head.state_dict(), self.folder / f"head{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_probe_fit_gives_every_rank_the_same_head(tmp_path: Path) -> None:
    """LP-FT's fitted probe under DDP: each rank extracts features of its own shard, gathers all of them and fits
    the same head, so the replicas start fine-tuning identical."""
    strategy, module, dm = build({"name": "lp_ft", "probe_fit": True, "probe_epochs": 0}, batch_size=8)
    init = {k: v.detach().clone() for k, v in module.head.state_dict().items()}
    run = trainer([*strategy.callbacks(), SaveHeadAtStart(tmp_path)], max_steps=1, devices=2, strategy="ddp_spawn")
    run.fit(module, datamodule=dm)
    rank0, rank1 = (torch.load(tmp_path / f"head{r}.pt") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert all(not torch.equal(rank0[k], init[k]) for k in rank0)
