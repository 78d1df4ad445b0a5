"""Image classification from class sub-folders (``<dir>/<class>/<image>``), decoded lazily with Pillow.

Preprocessing: resize the SHORTER side to ``image_size``, then centre-crop a square (keeps the aspect ratio,
the usual ImageNet evaluation recipe), plus a random horizontal flip for training when ``hflip`` is set.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import MISSING
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from src.data import DATA
from src.data.common import (
    ClassificationDataModule,
    DataConfig,
    check_fraction,
    check_path,
    fraction_split,
    read_label_names,
)
from src.data.transforms import (
    CenterCrop,
    Compose,
    Normalize,
    RandomHorizontalFlip,
    Resize,
    Transform,
    pil_to_tensor,
)
from src.schema import ConfigError

if TYPE_CHECKING:  # no runtime import: src.backbones imports src.data
    from src.backbones.base import Preprocessing

DEFAULT_IMAGE_SIZE = 224


@dataclass
class ImageFolderConfig(DataConfig):
    name: str = "image_folder"
    train_dir: str = MISSING  # required
    val_dir: str | None = None  # None: a seeded stratified val_fraction of train_dir
    test_dir: str | None = None  # None: test on the validation split
    target_dir: str | None = None  # domain adaptation: unlabelled target-domain images (any layout under it)
    target_test_dir: str | None = None  # labelled target-domain class folders, for evaluation only
    val_fraction: float = 0.2
    image_size: int | None = None  # None: the backbone's preprocessing.image_size, else 224
    hflip: bool = True  # random horizontal flip, training split only
    extensions: list[str] = field(default_factory=lambda: ["jpg", "jpeg", "png", "bmp", "gif", "webp"])
    label_names: Any = None  # class names for the sorted sub-folders, in that order: a list or a file; None: folders

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.train_dir == MISSING:
            raise ValueError(f"train_dir: required, got {self.train_dir!r}")
        check_fraction("val_fraction", self.val_fraction)
        for key in ("train_dir", "val_dir", "test_dir", "target_dir", "target_test_dir"):
            check_path(key, getattr(self, key), directory=True)
        if self.target_test_dir is not None and self.target_dir is None:
            raise ValueError("target_test_dir: needs target_dir (the unlabelled target training images) too")
        suffixes = {"." + ext.lower().lstrip(".") for ext in self.extensions}
        for key in ("target_dir", "target_test_dir"):  # the target must be the same kind of input as the source
            root = getattr(self, key)
            if root is not None and not any(p.suffix.lower() in suffixes for p in Path(root).rglob("*")):
                raise ValueError(
                    f"{key}: no files with extensions {sorted(suffixes)} under {root} (the target domain must be "
                    "images, like the source)"
                )
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"image_size: must be >= 1 or null, got {self.image_size}")
        if not self.extensions:
            raise ValueError(f"extensions: must list at least one file extension, got {self.extensions}")
        if self.label_names is not None:
            read_label_names("label_names", self.label_names)

    @property
    def has_target(self) -> bool:
        return self.target_dir is not None


def scan_folder(key: str, root: Path, extensions: list[str]) -> tuple[list[str], list[Path], list[str]]:
    """``(classes, files, class of each file)``: sorted sub-folders, and files Pillow can identify.

    Files with a listed extension that Pillow cannot open are skipped here, with one warning, so a stray bad
    file cannot crash a DataLoader worker mid-epoch.
    """
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"{key}: {root} has no class sub-folders")
    suffixes = {"." + ext.lower().lstrip(".") for ext in extensions}
    files, file_classes, skipped = [], [], []
    for name in classes:
        for path in sorted((root / name).rglob("*")):
            if not (path.is_file() and path.suffix.lower() in suffixes):
                continue
            try:
                with Image.open(path):
                    pass
            except (UnidentifiedImageError, OSError):
                skipped.append(path)
                continue
            files.append(path)
            file_classes.append(name)
    if not files:
        raise ValueError(f"{key}: no readable images with extensions {sorted(suffixes)} under {root}")
    if skipped:
        examples = ", ".join(str(p.relative_to(root)) for p in skipped[:3])
        warnings.warn(
            f"{key}: skipped {len(skipped)} file(s) under {root} that Pillow cannot open (e.g. {examples})",
            stacklevel=2,
        )
    return classes, files, file_classes


def image_transform(size: int, preprocessing: Preprocessing, hflip: bool) -> Transform:
    """Shorter side to ``size``, centre crop, optional flip, normalise with the backbone's statistics."""
    steps: list[Transform] = [Resize(size), CenterCrop(size)]
    if hflip:
        steps.append(RandomHorizontalFlip())
    steps.append(Normalize(preprocessing.mean, preprocessing.std))
    return Compose(steps)


class ImageFiles(Dataset):
    """Image paths decoded on access (memory stays flat however large the folder)."""

    def __init__(self, files: list[Path], labels: list[int] | None, mode: str, size: int, transform: Transform) -> None:
        self.files, self.labels, self.mode, self.size, self.transform = files, labels, mode, size, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        with Image.open(self.files[index]) as image:
            image.draft(self.mode, (self.size, self.size))  # JPEG: decode at a reduced scale >= size
            pixels = pil_to_tensor(image.convert(self.mode))
        item = {"pixel_values": self.transform(pixels)}
        return item if self.labels is None else {**item, "labels": self.labels[index]}


@DATA.register("image_folder", ImageFolderConfig)
class ImageFolderDataModule(ClassificationDataModule):
    """``train_dir``/``val_dir``/``test_dir`` class folders; classes are the sorted sub-folders of ``train_dir``."""

    modality = "image"
    cfg: ImageFolderConfig

    def __init__(self, cfg: ImageFolderConfig, preprocessing: Preprocessing, seed: int) -> None:
        super().__init__(cfg, preprocessing, seed)
        if preprocessing.channels not in (1, 3):
            raise ValueError(f"data '{cfg.name}' decodes 1 or 3 channels, backbone wants {preprocessing.channels}")
        self.mode = "L" if preprocessing.channels == 1 else "RGB"
        self.image_size = cfg.image_size or preprocessing.image_size or DEFAULT_IMAGE_SIZE

    @property
    def train_augmented(self) -> bool:
        return self.cfg.hflip

    def _dataset(self, files: list[Path], labels: list[int] | None, train: bool) -> ImageFiles:
        transform = image_transform(self.image_size, self.preprocessing, hflip=train and self.cfg.hflip)
        return ImageFiles(files, labels, self.mode, self.image_size, transform)

    def _scan(self, key: str, class_names: list[str]) -> tuple[list[Path], list[int]]:
        """Files and label indices of an evaluation folder, whose classes must all occur in ``train_dir``."""
        root = Path(getattr(self.cfg, key))
        classes, files, file_classes = scan_folder(key, root, self.cfg.extensions)
        if unseen := sorted(set(classes) - set(class_names)):
            raise ValueError(
                f"{key}: {root} has class folder(s) {unseen} that are not in train_dir {self.cfg.train_dir}; "
                f"train classes: {class_names}"
            )
        return files, [class_names.index(name) for name in file_classes]

    def _build(self) -> tuple[dict[str, Dataset], list[str]]:
        class_names, files, file_classes = scan_folder("train_dir", Path(self.cfg.train_dir), self.cfg.extensions)
        labels = np.array([class_names.index(name) for name in file_classes])
        if self.cfg.val_dir is None:
            train_idx, val_idx = fraction_split(labels.tolist(), self.cfg.val_fraction, self.seed)
            val = self._dataset([files[i] for i in val_idx], labels[val_idx].tolist(), train=False)
        else:
            train_idx = np.arange(len(files))
            val = self._dataset(*self._scan("val_dir", class_names), train=False)
        train_idx = train_idx[self.train_indices(labels[train_idx].tolist())]
        splits: dict[str, Dataset] = {
            "train": self._dataset([files[i] for i in train_idx], labels[train_idx].tolist(), train=True),
            "val": val,
        }
        if self.cfg.test_dir is not None:
            splits["test"] = self._dataset(*self._scan("test_dir", class_names), train=False)
        if self.cfg.target_dir is not None:
            splits["target_train"] = self._dataset(*self._scan_target(class_names), train=True)
        if self.cfg.target_test_dir is not None:
            splits["target_test"] = self._dataset(*self._scan("target_test_dir", class_names), train=False)
        return splits, self._display_names(class_names)

    def _scan_target(self, class_names: list[str]) -> tuple[list[Path], list[int] | None]:
        """The unlabelled target images: every image under ``target_dir``; labelled (for an oracle run only) when
        they all sit in class folders named like the train classes."""
        root = Path(self.cfg.target_dir)
        suffixes = {"." + ext.lower().lstrip(".") for ext in self.cfg.extensions}
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        folders = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else None for p in files]
        labelled = all(f in class_names for f in folders)
        return files, [class_names.index(f) for f in folders] if labelled else None

    def _display_names(self, folders: list[str]) -> list[str]:
        """``label_names`` (one per class folder, in sorted-folder order) when given, else the folder names."""
        if self.cfg.label_names is None:
            return folders
        names = read_label_names("label_names", self.cfg.label_names)
        if len(names) != len(folders):
            raise ConfigError(
                f"label_names: {len(names)} names for the {len(folders)} class folders of train_dir "
                f"{self.cfg.train_dir} {folders}; give one name per folder, in this order"
            )
        return names
