"""Discriminative LRs and the shared schedule: ratios between layer groups hold at every step."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from src.backbones import BACKBONES
from src.finetune.param_groups import layer_lrs
from src.module import Head
from src.optim import OptimConfig, build_optimizer, lr_factor
from tests.conftest import run_cli
from tests.test_failures import QUICK, only_run, run_in_process


def small_cnn():
    return BACKBONES.build({"name": "small_cnn", "pretrain": None}, pretrained=False)


def test_layer_lrs_decay_from_the_head() -> None:
    lrs = layer_lrs(1.0, 3, layer_decay=0.5, head_lr_mult=10.0)
    assert lrs == [0.125, 0.25, 0.5, 10.0]


@pytest.mark.parametrize("scheduler", ["warmup_cosine", "linear", "onecycle", "constant"])
@pytest.mark.parametrize("decay", [1.0, 0.8, 0.5])
def test_ratios_hold_under_every_schedule(scheduler: str, decay: float) -> None:
    backbone = small_cnn()
    groups = backbone.layer_groups()
    head = Head(backbone.feature_dim, 3)
    cfg = OptimConfig(lr=1e-2, layer_decay=decay, scheduler=scheduler, warmup_ratio=0.2)
    optimizer = build_optimizer(cfg, groups, head, weight_decay=0.01)
    total = 50
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, scheduler, 0.2, 0.0, 0.04))
    n = len(groups)
    seen_factors = set()
    for _ in range(total):
        by_group = {g["layer_group"]: g["lr"] for g in optimizer.param_groups}
        head_lr = by_group[n]
        seen_factors.add(round(head_lr / cfg.lr, 6))
        for i in range(n):
            assert by_group[i] == pytest.approx(head_lr * decay ** (n - i), rel=1e-9, abs=1e-15)
        optimizer.step()
        sched.step()
    if scheduler == "constant":
        assert seen_factors == {1.0}
    else:
        assert len(seen_factors) > 10, "the schedule must actually change the LR"
        assert min(seen_factors) < 0.3  # warmup starts low


def test_norm_and_bias_are_not_weight_decayed() -> None:
    backbone = small_cnn()
    head = Head(backbone.feature_dim, 3)
    optimizer = build_optimizer(OptimConfig(), backbone.layer_groups(), head, weight_decay=0.05)
    for group in optimizer.param_groups:
        dims = {p.ndim for p in group["params"]}
        assert group["weight_decay"] == (0.0 if dims == {1} else 0.05)
    covered = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert covered == {id(p) for p in [*backbone.parameters(), *head.parameters()]}


def test_explicit_group_lrs() -> None:
    backbone = small_cnn()
    n = len(backbone.layer_groups())
    lrs = [0.001 * (i + 1) for i in range(n + 1)]
    optimizer = build_optimizer(OptimConfig(group_lrs=lrs), backbone.layer_groups(), Head(8, 2), 0.0)
    assert {g["layer_group"]: g["lr"] for g in optimizer.param_groups} == dict(enumerate(lrs))


def test_onecycle_ramp_follows_its_knobs() -> None:
    """The ramp lasts warmup_ratio of the steps and starts at onecycle_start_ratio (no hidden constants)."""
    factors = [lr_factor(s, 100, "onecycle", 0.2, 0.0, 0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1)
    assert max(factors) == pytest.approx(1.0) and int(np.argmax(factors)) == 20
    assert factors[-1] < 0.01


def test_mlflow_lr_group_ratios_under_two_schedulers(tmp_path: Path) -> None:
    """A real multirun: per-epoch `lr-group-<i>` metrics keep lr * d^i (head = 0, times head_lr_mult) through
    warmup and annealing; under gradual_unfreeze `trainable_params` rises epoch by epoch."""
    d, mult = 0.5, 2.0
    proc = run_cli(
        [
            "-m",
            "optim.scheduler=warmup_cosine,onecycle",
            f"optim.layer_decay={d}",
            f"optim.head_lr_mult={mult}",
            "optim.warmup_ratio=0.5",
            "finetune=gradual_unfreeze",
            "data.batch_size=16",
            "trainer.max_epochs=4",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name("transfer-lab").experiment_id])
    runs = [r for r in found if r.data.tags.get("role") != "grid"]  # the grid's parent run holds no training
    assert sorted(r.data.params["optim.scheduler"] for r in runs) == ["onecycle", "warmup_cosine"]
    for run in runs:

        def history(key: str, run_id: str = run.info.run_id) -> list[float]:
            return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]

        head = history("lr-group-3")
        assert len(head) == 4 and len(set(head)) == 4, "the schedule must move the LR every epoch"
        assert head[0] < head[1], "epoch 1 is still warming up"
        for i in range(3):
            ratios = [lr / h for lr, h in zip(history(f"lr-group-{i}"), head, strict=True)]
            assert ratios == pytest.approx([d ** (3 - i) / mult] * 4, rel=1e-9)
        trainable = history("trainable_params")
        assert all(a < b for a, b in itertools.pairwise(trainable)), trainable


def composed_optim(*overrides: str):
    """`optim` of the composed config, resolved: what a run with these overrides trains with."""
    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    return OmegaConf.to_container(cfg.optim, resolve=True)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_every_optimizer_follows_the_lr_chain(name: str) -> None:
    """optim.lr defaults to the strategy's LR, which defaults to the backbone's (README), whichever optimizer."""
    assert composed_optim(f"optim={name}", "finetune=linear_probe")["lr"] == 3.0e-2
    assert composed_optim(f"optim={name}", "finetune=full", "backbone.lr=7e-4")["lr"] == 7e-4
    assert composed_optim(f"optim={name}", "finetune=full", "optim.lr=5e-3")["lr"] == 5e-3


def test_mixed_precision_with_gradient_clipping_trains(tmp_path: Path) -> None:
    """bf16-mixed + clipping (the default gradient_clip_val) trains: Lightning refuses to clip a fused AdamW's
    gradients under mixed precision, so the optimizer is not fused there (fused at full precision)."""
    overrides = ["finetune=full", "trainer.max_epochs=1", "trainer.limit_train_batches=3", *QUICK[1:]]
    assert run_in_process(tmp_path, "trainer.precision=bf16-mixed", *overrides) == 0
    run = only_run(tmp_path)
    assert run.info.status == "FINISHED" and run.data.params["trainer.precision"] == "bf16-mixed"
    assert run.data.metrics["train/loss"] > 0
