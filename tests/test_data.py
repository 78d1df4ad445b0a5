"""Data modules on real data: scikit-learn digits, generated tables/PNGs in tmp_path, and the shared SST-2 and
hymenoptera sets (skipped with a reason when ../shared/data is absent)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from src.backbones.base import Preprocessing
from src.data import DATA
from src.data.common import seeded_subset, stratified_split
from src.data.digits import digits_arrays
from src.data.tables import read_table
from src.data.transforms import CenterCrop, RandomHorizontalFlip, Resize
from src.schema import ConfigError
from tests.conftest import classification, shared

GREY = Preprocessing(modality="image", image_size=8, channels=1, mean=(0.5,), std=(0.5,))
RGB = Preprocessing(modality="image", channels=3)


def build(node: dict[str, Any], preprocessing: Preprocessing, seed: int = 0) -> Any:
    """Parse ``node`` through the registry (as a run does), build and set up the data module."""
    dm = DATA.build(node, preprocessing=preprocessing, seed=seed, task=classification())
    dm.setup("fit")
    return dm


def first_batch(loader: torch.utils.data.DataLoader) -> dict[str, torch.Tensor]:
    return next(iter(loader))


def all_labels(dataset: torch.utils.data.Dataset) -> list[int]:
    return [int(dataset[i]["labels"]) for i in range(len(dataset))]


# --- shared helpers -------------------------------------------------------------------------------------------


def test_stratified_split_is_seeded_and_per_class() -> None:
    labels = ["a"] * 10 + ["b"] * 20
    train, val, rest = stratified_split(labels, lambda n: [2, 3], seed=1)
    assert sorted(np.concatenate([train, val, rest]).tolist()) == list(range(30))
    assert [labels[i] for i in train].count("a") == 2 and [labels[i] for i in val].count("b") == 3
    assert (stratified_split(labels, lambda n: [2, 3], seed=1)[0] == train).all()
    assert not (stratified_split(labels, lambda n: [2, 3], seed=2)[0] == train).all()
    with pytest.raises(ValueError, match="class 'a' has 10 samples, needs at least 11"):
        stratified_split(labels, lambda n: [11], seed=0)


def test_seeded_subset() -> None:
    assert (seeded_subset(100, 10, 0) == seeded_subset(100, 10, 0)).all()
    assert not (seeded_subset(100, 10, 0) == seeded_subset(100, 10, 1)).all()
    assert seeded_subset(5, None, 0).tolist() == seeded_subset(5, 50, 0).tolist() == [0, 1, 2, 3, 4]


def test_transforms_resize_shorter_side_center_crop_and_flip() -> None:
    x = torch.arange(2 * 20 * 40, dtype=torch.float32).reshape(2, 20, 40)
    assert Resize(10)(x).shape == (2, 10, 20)
    assert CenterCrop(10)(Resize(10)(x)).shape == (2, 10, 10)
    assert torch.equal(CenterCrop(20)(x), x[:, :, 10:30])
    assert torch.equal(RandomHorizontalFlip(p=1.0)(x), x.flip(-1))


# --- digits ---------------------------------------------------------------------------------------------------


def test_digits_arrays() -> None:
    images, labels = digits_arrays()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert images.min() == 0 and images.max() == 1
    assert labels.dtype == torch.long and sorted(labels.unique().tolist()) == list(range(10))


def test_digits_splits_are_few_shot_disjoint_and_target_only() -> None:
    dm = build({"name": "digits", "labels_per_class": 3, "val_per_class": 5}, GREY)
    assert dm.task.num_outputs == 5 and dm.names == ["5", "6", "7", "8", "9"]
    assert dm.label_mapping == {"5": 0, "6": 1, "7": 2, "8": 3, "9": 4}
    images, labels = digits_arrays()
    original = {img.numpy().tobytes(): int(y) for img, y in zip(images, labels, strict=True)}
    seen: set[bytes] = set()
    for split, per_class in (("train", 3), ("val", 5), ("test", None)):
        dataset = getattr(dm, f"{split}_dataloader")().dataset
        keys = [img.numpy().tobytes() for img in dataset.images]
        assert not seen & set(keys), f"{split} overlaps an earlier split"
        seen |= set(keys)
        # every image is a target digit, re-indexed in target_classes order
        assert [original[k] for k in keys] == [5 + int(y) for y in dataset.labels]
        if per_class is not None:
            assert np.bincount(dataset.labels.numpy()).tolist() == [per_class] * 5
    assert len(seen) == int((labels >= 5).sum())  # test = all remaining target images


def test_digits_subset_is_seeded() -> None:
    def train_images(seed: int) -> torch.Tensor:
        return build({"name": "digits"}, GREY, seed=seed).train_dataloader().dataset.images

    assert torch.equal(train_images(0), train_images(0))
    assert not torch.equal(train_images(0), train_images(1))
    assert len(build({"name": "digits", "max_train_samples": 7}, GREY).train_dataloader().dataset) == 7


def test_max_train_per_class_caps_each_class_then_max_train_samples_applies() -> None:
    labels = build({"name": "digits", "max_train_per_class": 3}, GREY).train_dataloader().dataset.labels
    assert torch.bincount(labels).tolist() == [3] * 5  # 10 labels per class, capped at 3
    again = build({"name": "digits", "max_train_per_class": 3}, GREY).train_dataloader().dataset.labels
    assert torch.equal(labels, again)
    both = {"name": "digits", "max_train_per_class": 3, "max_train_samples": 4}
    assert len(build(both, GREY).train_dataloader().dataset) == 4


def test_digits_batches_are_normalised() -> None:
    dm = build({"name": "digits", "batch_size": 16}, GREY)
    batch = first_batch(dm.val_dataloader())
    assert batch["pixel_values"].shape == (16, 1, 8, 8) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].dtype == torch.long
    raw = dm.val_dataloader().dataset.images[:16]
    assert torch.allclose(batch["pixel_values"], (raw - 0.5) / 0.5)
    assert len(dm.test_dataloader().dataset) > len(dm.val_dataloader().dataset)


def test_digits_upsampled_for_rgb_backbones() -> None:
    dm = build({"name": "digits"}, Preprocessing(modality="image", image_size=32, channels=3))
    pixels = first_batch(dm.train_dataloader())["pixel_values"]
    assert pixels.shape == (32, 3, 32, 32)
    # the same grey image in every channel, normalised per channel with ImageNet statistics
    mean, std = torch.tensor(RGB.mean)[:, None, None], torch.tensor(RGB.std)[:, None, None]
    grey = pixels * std + mean
    assert torch.allclose(grey[:, 0], grey[:, 1], atol=1e-5) and torch.allclose(grey[:, 0], grey[:, 2], atol=1e-5)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"target_classes": [4, 5]}, "target_classes: must be disjoint from source_classes, both contain \\[4\\]"),
        ({"target_classes": [5, 5]}, "target_classes: must be distinct digits 0..9"),
        ({"labels_per_class": 0}, "labels_per_class: must be >= 1, got 0"),
        ({"batch_size": 0}, "batch_size: must be >= 1, got 0"),
    ],
)
def test_digits_config_errors(override: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DATA.config({"name": "digits", **override})


def test_digits_refuses_a_text_backbone() -> None:
    with pytest.raises(ValueError, match="produces image inputs but the backbone expects text"):
        DATA.build({"name": "digits"}, preprocessing=Preprocessing(modality="text"), seed=0, task=classification())


# --- text_table -----------------------------------------------------------------------------------------------


def table_rows(n: int = 40) -> list[dict[str, Any]]:
    """Distinct texts of varying length; string labels, 3:1 'pos':'neg'."""
    return [
        {"sentence": f"  sample {i}, " + "word " * (i % 7) + " ", "label": "neg" if i % 4 == 0 else "pos"}
        for i in range(n)
    ]


def write_table(path: Path, rows: list[dict[str, Any]]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if path.suffix == ".tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    return path


def token_rows(dataset: torch.utils.data.Dataset) -> list[tuple[int, ...]]:
    return [tuple(dataset[i]["input_ids"]) for i in range(len(dataset))]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_text_table_formats_with_string_labels(tmp_path: Path, text_pre: Preprocessing, suffix: str) -> None:
    rows = table_rows()
    train = write_table(tmp_path / f"train{suffix}", rows)
    val = write_table(tmp_path / f"val{suffix}", rows[:8])
    dm = build({"name": "text_table", "train_path": str(train), "val_path": str(val)}, text_pre)
    assert dm.names == ["neg", "pos"] and dm.label_mapping == {"neg": 0, "pos": 1} and dm.task.num_outputs == 2
    assert all_labels(dm.train_dataloader().dataset) == [0 if i % 4 == 0 else 1 for i in range(40)]
    # the comma inside the CSV text survived quoting; surrounding whitespace is gone
    second = dm.val_dataloader().dataset[1]["input_ids"]
    assert text_pre.tokenizer.decode(second, skip_special_tokens=True) == "sample 1, word"
    assert dm.test_dataloader().dataset is dm.val_dataloader().dataset


def test_text_table_integer_labels_sort_numerically_and_text_pairs(tmp_path: Path, text_pre: Preprocessing) -> None:
    rows = [{"premise": f"p {i}", "hypothesis": f"h {i}", "gold": (2, 10, 7)[i % 3]} for i in range(12)]
    train = write_table(tmp_path / "nli.jsonl", rows)
    node = {"name": "text_table", "train_path": str(train), "text_column": "premise", "text_pair_column": "hypothesis"}
    dm = build({**node, "label_column": "gold", "val_fraction": 0.25}, text_pre)
    assert dm.names == ["2", "7", "10"]
    batch = first_batch(dm.train_dataloader())
    assert batch["token_type_ids"].max() == 1  # the second segment is the hypothesis


def test_text_table_val_split_is_seeded_and_stratified(tmp_path: Path, text_pre: Preprocessing) -> None:
    train = write_table(tmp_path / "train.csv", table_rows())
    node = {"name": "text_table", "train_path": str(train), "val_fraction": 0.25}
    dm0, dm0_again, dm1 = build(node, text_pre, 0), build(node, text_pre, 0), build(node, text_pre, 1)
    val0, train0 = dm0.val_dataloader().dataset, dm0.train_dataloader().dataset
    assert token_rows(val0) == token_rows(dm0_again.val_dataloader().dataset)
    assert token_rows(val0) != token_rows(dm1.val_dataloader().dataset)
    assert not set(token_rows(val0)) & set(token_rows(train0)) and len(val0) + len(train0) == 40
    assert sorted(all_labels(val0)) == [0] * 2 + [1] * 8  # 25% of 10 neg and of 30 pos
    assert len(dm0.test_dataloader().dataset) == 10  # no test_path: test on val


def test_text_table_max_train_samples_is_a_seeded_subset(tmp_path: Path, text_pre: Preprocessing) -> None:
    train = write_table(tmp_path / "train.tsv", table_rows())
    val = write_table(tmp_path / "val.tsv", table_rows(4))
    node = {"name": "text_table", "train_path": str(train), "val_path": str(val), "max_train_samples": 10}
    full = set(token_rows(build({**node, "max_train_samples": None}, text_pre).train_dataloader().dataset))
    sub0, sub0_again, sub1 = (token_rows(build(node, text_pre, seed).train_dataloader().dataset) for seed in (0, 0, 1))
    assert len(sub0) == 10 and sub0 == sub0_again and sub0 != sub1 and set(sub0) <= full


def test_text_table_pads_each_batch_to_its_longest(tmp_path: Path, text_pre: Preprocessing) -> None:
    train = write_table(tmp_path / "train.csv", table_rows())
    dm = build({"name": "text_table", "train_path": str(train), "max_length": 128, "batch_size": 8}, text_pre)
    widths = set()
    for batch in dm.train_dataloader():
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
        assert batch["labels"].dtype == torch.long and batch["input_ids"].dtype == torch.long
        assert batch["input_ids"].shape[1] == batch["attention_mask"].sum(1).max() < 128
        widths.add(batch["input_ids"].shape[1])
    assert len(widths) > 1  # dynamic, not a fixed pad length


def test_text_table_truncates_to_max_length(tmp_path: Path, text_pre: Preprocessing) -> None:
    train = write_table(tmp_path / "train.csv", [{"sentence": "word " * 50, "label": i % 2} for i in range(10)])
    dm = build({"name": "text_table", "train_path": str(train), "max_length": 16}, text_pre)
    assert first_batch(dm.train_dataloader())["input_ids"].shape[1] == 16


def test_text_table_errors(tmp_path: Path, text_pre: Preprocessing) -> None:
    train = write_table(tmp_path / "train.csv", table_rows())
    missing = tmp_path / "nope.csv"
    with pytest.raises(FileNotFoundError, match=re.escape(f"val_path: no such file '{missing}'")):
        build({"name": "text_table", "train_path": str(train), "val_path": str(missing)}, text_pre)
    with pytest.raises(ValueError, match=r"no column 'text'; available columns: \['sentence', 'label'\]"):
        build({"name": "text_table", "train_path": str(train), "text_column": "text"}, text_pre)
    val = write_table(tmp_path / "val.csv", [{"sentence": "x", "label": "neutral"}])
    with pytest.raises(
        ValueError, match=re.escape(f"val_path: {val} has label(s) ['neutral'] that do not occur in train")
    ):
        build({"name": "text_table", "train_path": str(train), "val_path": str(val)}, text_pre)
    with pytest.raises(ValueError, match="cannot infer the format of 'data.txt'"):
        DATA.config({"name": "text_table", "train_path": "data.txt"})
    with pytest.raises(ValueError, match="val_fraction: must be in \\(0, 1\\), got 1.5"):
        DATA.config({"name": "text_table", "train_path": str(train), "val_fraction": 1.5})


def test_sst2(text_pre: Preprocessing) -> None:
    root = shared("sst2")
    counts = {split: len(read_table("path", root / f"{split}.tsv").lines) for split in ("train", "dev", "test")}
    assert counts == {"train": 67349, "dev": 872, "test": 1821}
    node = {
        "name": "text_table",
        "train_path": str(root / "train.tsv"),
        "val_path": str(root / "dev.tsv"),
        "test_path": str(root / "test.tsv"),
        "max_length": 64,
        "max_train_samples": 512,
    }
    dm = build(node, text_pre)
    assert dm.label_mapping == {"0": 0, "1": 1}
    lengths = [len(loader().dataset) for loader in (dm.train_dataloader, dm.val_dataloader, dm.test_dataloader)]
    assert lengths == [512, 872, 1821]
    batch = first_batch(dm.test_dataloader())
    assert batch["input_ids"].shape[0] == 32 and batch["input_ids"].shape[1] <= 64
    assert set(batch["labels"].tolist()) <= {0, 1}


# --- image_folder ---------------------------------------------------------------------------------------------

COLOURS = {"cat": (255, 0, 0), "dog": (0, 128, 255), "owl": (10, 200, 30)}


def image_tree(root: Path, per_class: int = 6, classes: tuple[str, ...] = tuple(COLOURS)) -> Path:
    """Solid-colour PNGs of assorted sizes, plus a corrupt image and a non-image file."""
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (20 + 3 * i, 12 + i), COLOURS[name]).save(root / name / f"{i}.png")
    (root / classes[0] / "broken.png").write_bytes(b"not a png")
    (root / classes[-1] / "notes.txt").write_text("skipped: not an image extension")
    return root


def test_image_folder_tmp_pngs(tmp_path: Path) -> None:
    train = image_tree(tmp_path / "train")
    node = {"name": "image_folder", "train_dir": str(train), "val_fraction": 0.5, "image_size": 16}
    with pytest.warns(UserWarning, match=r"skipped 2 file\(s\) .* Pillow can open .*: cat/broken.png, owl/notes.txt"):
        dm = build({**node, "batch_size": 4}, RGB)
    assert dm.names == ["cat", "dog", "owl"] and dm.label_mapping == {"cat": 0, "dog": 1, "owl": 2}
    assert sorted(all_labels(dm.val_dataloader().dataset)) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    batch = first_batch(dm.train_dataloader())
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and batch["labels"].dtype == torch.long
    val = first_batch(dm.val_dataloader())
    mean, std = torch.tensor(RGB.mean), torch.tensor(RGB.std)
    for pixels, label in zip(val["pixel_values"], val["labels"], strict=True):
        expected = (torch.tensor(COLOURS[dm.names[label]]) / 255 - mean) / std
        assert torch.allclose(pixels, expected[:, None, None].expand(3, 16, 16), atol=1e-4)

    def val_files(seed: int) -> list[Path]:
        with pytest.warns(UserWarning):
            return build(node, RGB, seed).val_dataloader().dataset.files

    assert val_files(0) == val_files(0) != val_files(1)


def test_image_folder_grey_and_val_dir(tmp_path: Path) -> None:
    train = image_tree(tmp_path / "train", per_class=2)
    val = image_tree(tmp_path / "val", per_class=1, classes=("cat", "dog"))
    grey = Preprocessing(modality="image", image_size=12, channels=1, mean=(0.5,), std=(0.5,))
    with pytest.warns(UserWarning):
        dm = build({"name": "image_folder", "train_dir": str(train), "val_dir": str(val)}, grey)
    assert len(dm.train_dataloader().dataset) == 6 and len(dm.val_dataloader().dataset) == 2
    assert first_batch(dm.val_dataloader())["pixel_values"].shape == (2, 1, 12, 12)

    unseen = image_tree(tmp_path / "unseen", per_class=1, classes=("cat", "owl"))
    (unseen / "cow").mkdir()
    Image.new("RGB", (8, 8)).save(unseen / "cow" / "0.png")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"test_dir: .* class folder\(s\) \['cow'\]"):
        build({"name": "image_folder", "train_dir": str(train), "test_dir": str(unseen)}, grey)
    with pytest.raises(FileNotFoundError, match="train_dir: no such directory"):
        build({"name": "image_folder", "train_dir": str(tmp_path / "missing")}, grey)


def test_hymenoptera() -> None:
    root = shared("hymenoptera", "hymenoptera_data")
    dm = build({"name": "image_folder", "train_dir": str(root / "train"), "val_dir": str(root / "val")}, RGB)
    assert dm.names == ["ants", "bees"] and dm.task.num_outputs == 2
    assert (len(dm.train_dataloader().dataset), len(dm.val_dataloader().dataset)) == (245, 153)
    # the stray GIF (a palette "image not found" placeholder) decodes like any other image
    train = dm.train_dataloader().dataset
    gif = next(i for i, path in enumerate(train.files) if path.suffix == ".gif")
    assert train[gif]["pixel_values"].shape == (3, 224, 224)
    batch = first_batch(dm.val_dataloader())
    assert batch["pixel_values"].shape == (32, 3, 224, 224) and batch["pixel_values"].dtype == torch.float32
    assert -3 < batch["pixel_values"].mean() < 3 and batch["labels"].dtype == torch.long


# --- image folders: label names -------------------------------------------------------------------------------


def test_image_folder_label_names(tmp_path: Path) -> None:
    train = image_tree(tmp_path / "train", per_class=2)
    names = tmp_path / "names.txt"
    names.write_text("Felis catus\nCanis familiaris\nStrigiformes\n")
    node = {"name": "image_folder", "train_dir": str(train), "val_dir": str(train), "image_size": 8}
    with pytest.warns(UserWarning):  # the tree's deliberately broken file
        dm = build({**node, "label_names": str(names)}, RGB)
    assert dm.names == ["Felis catus", "Canis familiaris", "Strigiformes"]
    assert dm.label_mapping == {"Felis catus": 0, "Canis familiaris": 1, "Strigiformes": 2}
    assert sorted(set(all_labels(dm.val_dataloader().dataset))) == [0, 1, 2]
    with pytest.warns(UserWarning), pytest.raises(ConfigError, match=r"label_names: 2 names for the 3 class folders"):
        build({**node, "label_names": ["cat", "dog"]}, RGB)
