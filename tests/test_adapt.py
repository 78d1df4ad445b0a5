"""Domain adaptation on real digits: gradient reversal, each method's own loss, the target domain's loaders (no
labels reach a non-oracle run), the label-free scores, the selection report, and config errors before compute."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from src.adapt import ADAPT
from src.adapt.base import ramp
from src.adapt.methods import grad_reverse
from src.adapt.selection import information_maximization, selection_report, soft_neighborhood_density
from src.backbones import BACKBONES
from src.config import ConfigError, validate
from src.data import DATA
from src.data.digits import digits_arrays, shift_images
from src.module import Head, TransferModule
from src.optim import OptimConfig, configure_optimizers
from tests.conftest import classification, composed
from tests.test_failures import QUICK, only_run, restore_signals, run_in_process  # noqa: F401

# method -> (config overrides, the metric of its own unweighted loss)
METHODS = {
    "dann": ({"hidden": 64}, "train/domain_loss"),
    "cdan": ({"hidden": 64}, "train/domain_loss"),
    "coral": ({"ramp": False}, "train/coral_raw"),
    "mcc": ({"ramp": False}, "train/mcc_raw"),
    "entropy": ({"ramp": False, "weight": 1.0}, "train/entropy_raw"),
}


def test_gradient_reversal_flips_and_scales_the_gradient() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    y = grad_reverse(x, 0.3)
    assert torch.equal(y, x)  # identity forward
    (y * torch.arange(3.0)).sum().backward()
    assert torch.allclose(x.grad, -0.3 * torch.arange(3.0).expand(4, 3))


def test_ramp_schedule() -> None:
    assert ramp(0.0) == 0.0
    assert ramp(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert 0.98 < ramp(0.5) < 1.0


def digits_dm(shift: str = "rotate", batch_size: int = 32):
    backbone = BACKBONES.build({"name": "small_cnn", "pretrain": None})
    dm = DATA.build(
        {"name": "digits", "batch_size": batch_size, "labels_per_class": 40, "target_shift": shift},
        preprocessing=backbone.preprocessing,
        seed=0,
        task=classification(),
    )
    dm.setup("fit")
    return backbone, dm


def test_shifts_change_images_and_target_splits_are_disjoint_from_source() -> None:
    images = torch.rand(5, 1, 8, 8)
    for shift in ("invert", "rotate", "noise"):
        shifted = shift_images(images, shift, seed=0)
        assert shifted.shape == images.shape and not torch.allclose(shifted, images)
        assert shifted.min() >= 0 and shifted.max() <= 1
    _, dm = digits_dm()
    sizes = {split: len(dm._splits[split]) for split in ("train", "val", "target_train", "target_test")}
    assert sizes["train"] == 40 * 5 and sizes["val"] == 20 * 5
    _, labels = digits_arrays()
    assert sum(sizes.values()) == int((labels >= 5).sum())  # every image of digits 5-9 exactly once
    assert abs(sizes["target_train"] - sizes["target_test"]) <= 5


def test_target_labels_never_reach_a_non_oracle_run() -> None:
    _, dm = digits_dm()
    dm.target_role = "eval"
    assert not isinstance(dm.train_dataloader(), dict)  # source only
    dm.target_role = "adapt"
    loaders = dm.train_dataloader()
    assert len(loaders["target"]) == len(loaders["source"])
    for batch in loaders["target"]:
        assert set(batch) == {"pixel_values"}
    assert "labels" not in next(iter(dm.target_dataloaders()["unlabelled"]))
    dm.target_role = "oracle"  # only asked for: the labelled, shifted target images
    batch = next(iter(dm.train_dataloader()))
    assert "labels" in batch and len(dm.train_dataloader().dataset) == len(dm._splits["target_train"])


class SpyTerm:
    """Records what the target half of each training batch carries."""

    name = "spy"

    def __init__(self) -> None:
        self.target_keys: set[str] = set()

    def __call__(self, module: pl.LightningModule, batch: dict, logits: torch.Tensor) -> torch.Tensor:
        self.target_keys |= set(batch["target"])
        return logits.new_zeros(())


class EpochMetrics(pl.Callback):
    def __init__(self, metric: str) -> None:
        self.metric, self.values = metric, []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.values.append(float(trainer.callback_metrics[self.metric]))


def fit_with(method: str, train_backbone: bool = True) -> tuple[TransferModule, SpyTerm, list[float]]:
    """A few epochs of `method` on digits -> inverted digits; the per-epoch mean of the method's own loss."""
    pl.seed_everything(0)
    overrides, metric = METHODS[method]
    backbone, dm = digits_dm("invert")
    backbone.requires_grad_(train_backbone)
    adapter = ADAPT.build(
        {"name": method, **overrides}, feature_dim=backbone.feature_dim, num_classes=dm.task.num_outputs
    )
    dm.target_role = adapter.target_role
    spy = SpyTerm()
    module = TransferModule(
        backbone,
        Head(backbone.feature_dim, dm.task.num_outputs),
        dm.task,
        configure_optim=partial(configure_optimizers, cfg=OptimConfig(lr=3e-3, warmup_ratio=0.0), weight_decay=0.0),
        loss_terms=[*adapter.loss_terms(), spy],
        aux_modules=adapter.modules(),
    )
    record = EpochMetrics(metric)
    trainer = pl.Trainer(
        max_epochs=4,
        callbacks=[record],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        accelerator="cpu",
    )
    trainer.fit(module, datamodule=dm)
    assert spy.target_keys == {"pixel_values", "features", "logits"}  # inputs and outputs, never labels
    return module, spy, record.values


@pytest.mark.parametrize("method", ["coral", "mcc", "entropy"])
def test_each_method_lowers_its_own_loss(method: str) -> None:
    _, _, values = fit_with(method)
    assert values[-1] < values[0], values


@pytest.mark.parametrize("method", ["dann", "cdan"])
def test_adversarial_methods_train_the_discriminator_and_align_features(method: str) -> None:
    """The discriminator lowers its domain loss on fixed features; with the backbone training through the gradient
    reversal, the features fool it: its domain loss ends higher than on the fixed features."""
    frozen_module, _, frozen = fit_with(method, train_backbone=False)
    assert frozen[-1] < frozen[0], frozen
    assert all(p.grad is not None for p in frozen_module.aux_modules.parameters())
    _, _, aligned = fit_with(method)
    assert aligned[-1] > frozen[-1], (aligned, frozen)


def test_label_free_scores() -> None:
    uniform = torch.full((50, 5), 0.2)
    confident = torch.eye(5).repeat(10, 1) * 0.96 + 0.01
    assert information_maximization(uniform) == pytest.approx(0.0, abs=1e-6)
    assert information_maximization(confident) > 1.0  # log 5 = 1.61 minus a small per-sample entropy
    collapsed_to_one_class = torch.eye(5)[[0] * 50] * 0.96 + 0.01
    assert information_maximization(collapsed_to_one_class) < 0.05
    # SND: the entropy of each sample's neighbour distribution. In 5 tight clusters of 10, a sample's 9 cluster mates
    # share its softmax similarity: log 9. One cluster of all 50 (collapse) scores log 49, SND's known bias.
    assert soft_neighborhood_density(confident) == pytest.approx(math.log(9), abs=1e-3)
    assert soft_neighborhood_density(collapsed_to_one_class) == pytest.approx(math.log(49), abs=1e-3)
    spread = torch.randn(50, 5, generator=torch.Generator().manual_seed(0)).softmax(-1)
    assert math.log(9) < soft_neighborhood_density(spread) < math.log(49)


def test_selection_report_picks_each_criteria_epoch() -> None:
    history = [
        {"epoch": 0, "val/acc": 0.9, "val/target_im": 0.1, "val/target_snd": 3.0, "target/acc": 0.5},
        {"epoch": 1, "val/acc": 0.8, "val/target_im": 0.5, "val/target_snd": 2.0, "target/acc": 0.7},
        {"epoch": 2, "val/acc": 0.9, "val/target_im": 0.3, "val/target_snd": 1.0, "target/acc": 0.6},
    ]
    report = selection_report(history, "val/target_im")
    assert {name: row["epoch"] for name, row in report.items()} == {
        "source_val": 0,
        "im": 1,
        "snd": 0,
        "oracle": 1,
        "checkpoint": 1,
        "last": 2,
    }
    assert report["oracle"]["target_acc"] == 0.7 and report["source_val"]["target_acc"] == 0.5
    assert selection_report(history, "val/acc", maximize=False)["checkpoint"]["epoch"] == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["adapt=dann"], r"^adapt: adapt=dann needs a target domain, but data 'digits' has none"),
        (["adapt=coral", "data.target_shift=invert", "finetune=linear_probe"], r"^adapt: adapt=coral aligns backbone"),
        (["objective.metric=val/target_snd"], r"^adapt: objective.metric=val/target_snd is a target-domain score"),
        (["data.target_shift=blur"], r"^data\.target_shift: must be one of invert, rotate, noise"),
        (["adapt=dann", "data.target_shift=invert", "adapt.weight=-1"], r"^adapt\.weight: must be >= 0"),
        (["adapt=mcc", "data.target_shift=invert", "+adapt.hidden=3"], r"^adapt\.hidden"),
    ],
)
def test_bad_adaptation_configs_fail_before_compute(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(composed(*overrides))


@pytest.mark.usefixtures("restore_signals")
def test_feature_alignment_trains_lora_adapters_end_to_end(tmp_path: Path, capsys) -> None:
    """LoRA's adapters change the features inside frozen groups, so feature alignment applies (it was refused)."""
    overrides = ["adapt=dann", "data.target_shift=invert", "finetune=lora", *QUICK, "trainer.max_epochs=1"]
    assert run_in_process(tmp_path, *overrides) == 0, capsys.readouterr().err[-2000:]
    run = only_run(tmp_path)
    assert run.info.status == "FINISHED" and "train/dann" in run.data.metrics


def test_prediction_level_methods_combine_with_a_linear_probe() -> None:
    cfg = validate(composed("adapt=mcc", "data.target_shift=rotate", "finetune=linear_probe"))
    assert cfg.adapt.name == "mcc" and cfg.data.has_target


def test_text_target_tables_are_checked_at_validation(tmp_path: Path) -> None:
    train = tmp_path / "train.csv"
    train.write_text("sentence,label\ngood,1\nbad,0\n")
    wrong_kind = tmp_path / "target.csv"
    wrong_kind.write_text("path\nimg1.png\n")
    base = ["data=text_table", "backbone=minilm", f"data.train_path={train}", "adapt=dann"]
    with pytest.raises(ConfigError, match=r"^data\.target_path: .* has no column 'sentence'"):
        validate(composed(*base, f"data.target_path={wrong_kind}"))
    with pytest.raises(ConfigError, match=r"^data\.target_path: no such file"):
        validate(composed(*base, f"data.target_path={tmp_path / 'absent.csv'}"))
    image = tmp_path / "target.jsonl"
    image.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    with pytest.raises(ConfigError, match=r"^data\.target_path: .* has no column 'sentence'"):
        validate(composed(*base, f"data.target_path={image}"))


def test_image_folder_target_dirs(tmp_path: Path) -> None:
    from PIL import Image

    for folder, names in (("train/cat", "ab"), ("train/dog", "ab"), ("target", "abc"), ("target_test/cat", "a")):
        (tmp_path / folder).mkdir(parents=True)
        for name in names:
            Image.new("RGB", (12, 12), (len(folder) * 9, 0, 0)).save(tmp_path / folder / f"{name}.png")
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.csv").write_text("sentence\nhi\n")
    base = ["data=image_folder", f"data.train_dir={tmp_path / 'train'}", "adapt=coral"]
    with pytest.raises(ConfigError, match=r"^data\.target_dir: no files with extensions .* must be images"):
        validate(composed(*base, f"data.target_dir={tmp_path / 'texts'}"))
    cfg = validate(
        composed(*base, f"data.target_dir={tmp_path / 'target'}", f"data.target_test_dir={tmp_path / 'target_test'}")
    )
    backbone = BACKBONES.build({"name": "small_cnn", "pretrain": None, "in_channels": 3})
    dm = DATA.build(cfg.data.__dict__, preprocessing=backbone.preprocessing, seed=0, task=classification())
    dm.setup("fit")
    dm.target_role = "adapt"
    batch = next(iter(dm.train_dataloader()["target"]))
    assert set(batch) == {"pixel_values"} and len(dm._splits["target_train"]) == 3  # a flat folder: no labels
    assert next(iter(dm.target_dataloaders()["test"]))["labels"].tolist() == [0]
    dm.target_role = "oracle"
    with pytest.raises(ValueError, match="adapt=oracle trains on target labels, the target has none"):
        dm.train_dataloader()
