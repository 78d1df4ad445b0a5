"""Image classification from class sub-folders (``<dir>/<class>/<image>``), decoded with Pillow.

Preprocessing: resize the SHORTER side to ``image_size / crop_pct`` (the backbone's crop share), then centre-crop
``image_size`` (keeps the aspect ratio, the usual ImageNet evaluation recipe), plus a random horizontal flip for
training when ``hflip`` is set. Any Pillow mode is converted (transparent images onto white). Decoded, resized
images are kept in memory as uint8 and in the shared disk cache (``cache_images``), so later epochs and runs only
flip and normalise.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from src.cache import Cache, file_digest, fingerprint
from src.data.common import DataModule
from src.data.config import ImageFolderConfig, read_label_names
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
    from src.config import CVConfig
    from src.tasks.base import Task

log = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE = 224


def shorter_side(path: Path) -> int | None:
    """The image's shorter side in pixels, read from its header; None when Pillow cannot open the file."""
    try:
        with Image.open(path) as image:
            return min(image.size)
    except (UnidentifiedImageError, OSError):
        return None


def scan_folder(
    key: str, root: Path, extensions: list[str], min_side: int = 1
) -> tuple[list[str], list[Path], list[str]]:
    """``(classes, files, class of each file)``: sorted sub-folders, and the files in them Pillow can identify.

    Every other file (another extension, or one Pillow cannot open) is skipped here, named in one warning, so a
    stray file cannot crash a DataLoader worker mid-epoch; hidden files are skipped silently. Images whose
    shorter side is below ``min_side`` are named in one more warning: they will be upscaled.
    """
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"{key}: {root} has no class sub-folders")
    suffixes = {"." + ext.lower().lstrip(".") for ext in extensions}
    files, file_classes, skipped, small = [], [], [], []
    for name in classes:
        for path in sorted((root / name).rglob("*")):
            if not path.is_file() or path.name.startswith("."):
                continue
            side = shorter_side(path) if path.suffix.lower() in suffixes else None
            if side is None:
                skipped.append(path)
                continue
            if side < min_side:
                small.append(path)
            files.append(path)
            file_classes.append(name)
    if not files:
        raise ValueError(f"{key}: no readable images with extensions {sorted(suffixes)} under {root}")

    def examples(paths: list[Path]) -> str:
        return ", ".join(str(p.relative_to(root)) for p in paths[:3]) + (", ..." if len(paths) > 3 else "")

    if skipped:
        warnings.warn(
            f"{key}: skipped {len(skipped)} file(s) under {root} that are not images Pillow can open with an "
            f"extension in {sorted(suffixes)}: {examples(skipped)}",
            stacklevel=2,
        )
    if small:
        warnings.warn(
            f"{key}: {len(small)} image(s) under {root} have a shorter side below {min_side} px and are upscaled: "
            f"{examples(small)}",
            stacklevel=2,
        )
    return classes, files, file_classes


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    """Any Pillow mode (grey, palette, CMYK, 16-bit, with alpha) as ``mode``; transparency composited on white."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image.alpha_composite(rgba)
    elif image.mode.startswith("I") or image.mode == "F":  # 16/32-bit grey: rescale to 8 bits, not clip
        array = np.asarray(image, dtype=np.float32)
        image = Image.fromarray(np.uint8(255 * (array - array.min()) / max(float(np.ptp(array)), 1e-12)))
    return image.convert(mode)


class ImageDecoder:
    """File -> ``(C, size, size)`` uint8 tensor: decode, convert, resize the shorter side to ``resize``, centre
    crop ``size``. Deterministic, so its output can be cached; random augmentation comes after it.
    """

    def __init__(self, mode: str, resize: int, size: int) -> None:
        self.mode, self.resize, self.size = mode, resize, size
        self.transform = Compose([Resize(resize), CenterCrop(size)])

    def settings(self) -> dict[str, Any]:
        """Everything that determines the output besides the file (a cache key part; bump the version when the
        decoding code changes)."""
        return {"mode": self.mode, "resize": self.resize, "size": self.size, "version": 1}

    def __call__(self, path: Path) -> torch.Tensor:
        with Image.open(path) as image:
            image.draft(self.mode, (self.resize, self.resize))  # JPEG: decode at a reduced scale >= resize
            pixels = pil_to_tensor(to_mode(image, self.mode))
        return (self.transform(pixels) * 255).round().to(torch.uint8)


def image_transform(preprocessing: Preprocessing, hflip: bool) -> Transform:
    """What follows decoding: optional flip, normalisation with the backbone's statistics."""
    steps: list[Transform] = [RandomHorizontalFlip()] if hflip else []
    steps.append(Normalize(preprocessing.mean, preprocessing.std))
    return Compose(steps)


class ImageFiles(Dataset):
    """Image files, decoded on every access, or once when a ``store`` is given: then the whole split is one uint8
    tensor in memory, also stored in the shared on-disk cache (`src.cache`, namespace ``images``) under the
    files' contents and the decoder settings, so later runs and sweep jobs on the same folder skip decoding.
    """

    def __init__(
        self,
        files: list[Path],
        labels: list[int] | None,
        decode: ImageDecoder,
        transform: Transform,
        store: Cache | None,
    ) -> None:
        self.files, self.labels, self.decode, self.transform = files, labels, decode, transform
        self.cached: torch.Tensor | None = None
        if store is not None:
            start = time.perf_counter()
            key = fingerprint(decode.settings(), [file_digest(path) for path in files])
            self.cached = store.get_or_compute(key, lambda: torch.stack([decode(path) for path in files]))
            how = "decoded" if store.stats.misses else f"loaded from {store.dir}"
            log.info("%d images %s in %.1fs", len(files), how, time.perf_counter() - start)

    def __len__(self) -> int:
        return len(self.files)

    def pixels(self, index: int) -> torch.Tensor:
        """One decoded image before its transform, in [0, 1] (what an evaluation set's shift changes)."""
        pixels = self.cached[index] if self.cached is not None else self.decode(self.files[index])
        return pixels.float() / 255

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {"pixel_values": self.transform(self.pixels(index))}
        return item if self.labels is None else {**item, "labels": self.labels[index]}


class ImageFolderDataModule(DataModule):
    """``train_dir``/``val_dir``/``test_dir`` class folders; classes are the sorted sub-folders of ``train_dir``."""

    modality = "image"
    cfg: ImageFolderConfig

    def __init__(
        self, cfg: ImageFolderConfig, preprocessing: Preprocessing, seed: int, task: Task, cv: CVConfig | None = None
    ) -> None:
        super().__init__(cfg, preprocessing, seed, task, cv)
        if preprocessing.channels not in (1, 3):
            raise ValueError(f"data '{cfg.name}' decodes 1 or 3 channels, backbone wants {preprocessing.channels}")
        mode = "L" if preprocessing.channels == 1 else "RGB"
        self.image_size = cfg.image_size or preprocessing.image_size or DEFAULT_IMAGE_SIZE
        if self.image_size < preprocessing.min_image_size:
            raise ConfigError(
                f"data.image_size: {self.image_size} px is below the {preprocessing.min_image_size} px the backbone "
                f"takes; use >= {preprocessing.min_image_size} (or null: the backbone's {preprocessing.image_size})"
            )
        self.decoder = ImageDecoder(mode, round(self.image_size / preprocessing.crop_pct), self.image_size)

    @property
    def train_augmented(self) -> bool:
        return self.cfg.hflip

    def _dataset(self, files: list[Path], labels: list[int] | None, train: bool) -> ImageFiles:
        transform = image_transform(self.preprocessing, hflip=train and self.cfg.hflip)
        store = Cache("images", self.cfg.cache_dir) if self.cfg.cache_images else None
        return ImageFiles(files, labels, self.decoder, transform, store)

    def _files(self, key: str, root: str) -> tuple[list[str], list[Path], list[str]]:
        return scan_folder(key, Path(root), self.cfg.extensions, min_side=self.image_size)

    def _scan(self, key: str, class_names: list[str], root: str | None = None) -> tuple[list[Path], list[int]]:
        """Files and label indices of an evaluation folder (config key ``key``, or ``root`` when the key is not a
        field), whose classes must all occur in ``train_dir``."""
        root = root or getattr(self.cfg, key)
        classes, files, file_classes = self._files(key, root)
        if unseen := sorted(set(classes) - set(class_names)):
            raise ValueError(
                f"{key}: {root} has class folder(s) {unseen} that are not in train_dir "
                f"{self.cfg.train_dir}; train classes: {class_names}"
            )
        return files, [class_names.index(name) for name in file_classes]

    def _build(self) -> tuple[dict[str, Dataset], list[str]]:
        class_names, files, file_classes = self._files("train_dir", self.cfg.train_dir)
        labels = np.array([class_names.index(name) for name in file_classes])
        if self.cfg.val_dir is None:
            train_idx, val_idx = self.val_split(labels.tolist(), self.cfg.val_fraction)
            val = self._dataset([files[i] for i in val_idx], labels[val_idx].tolist(), train=False)
        else:
            train_idx = self.train_indices(labels.tolist())
            val = self._dataset(*self._scan("val_dir", class_names), train=False)
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

        def labelled(name: str, key: str, root: str) -> Dataset:
            return self._dataset(*self._scan(key, class_names, root), train=False)

        return {**splits, **self.eval_splits(splits, labelled)}, self._display_names(class_names)

    def _scan_target(self, class_names: list[str]) -> tuple[list[Path], list[int] | None]:
        """The unlabelled target images: every image under ``target_dir``; labelled (for an oracle run only) when
        they all sit in class folders named like the train classes."""
        root = Path(self.cfg.target_dir)
        suffixes = self.cfg.suffixes()
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
