"""What every data module shares: base config fields, seeded sampling/splitting, and the loaders.

Keeping these in one place means "seeded subset", "stratified split" and "how batches are loaded" mean
the same thing for every dataset, so runs are comparable across data modules.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import numpy as np
from torch.utils.data import DataLoader, Dataset

from src.schema import ConfigError, blame

if TYPE_CHECKING:  # runtime import would cycle: backbones (small_cnn) import src.data.digits
    from src.backbones.base import Preprocessing


@dataclass
class DataConfig:
    """Fields every data module accepts; subclasses override ``name`` with their registry name."""

    name: str = "???"
    batch_size: int = 32
    eval_batch_size: int | None = None  # None: same as batch_size
    num_workers: int = 0
    max_train_samples: int | None = None  # seeded random subset of the training split (seed = run seed)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size: must be >= 1 or null, got {self.eval_batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers: must be >= 0, got {self.num_workers}")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ValueError(f"max_train_samples: must be >= 1 or null, got {self.max_train_samples}")


def check_path(key: str, path: str | None, directory: bool = False) -> None:
    """Fail at config validation, before any model is loaded, when an input file/folder is missing."""
    if path is None:
        return
    found = Path(path).is_dir() if directory else Path(path).is_file()
    if not found:
        kind = "directory" if directory else "file"
        raise FileNotFoundError(
            f"{key}: no such {kind} {path!r} (relative paths resolve against the launch directory {Path.cwd()})"
        )


def check_fraction(field_name: str, value: float) -> None:
    """Validation split fractions must leave something on both sides."""
    if not 0.0 < value < 1.0:
        raise ValueError(f"{field_name}: must be in (0, 1), got {value}")


def seeded_subset(n: int, k: int | None, seed: int) -> np.ndarray:
    """Sorted indices of ``k`` of ``n`` items drawn with ``seed`` (all of them when ``k`` is None or >= n)."""
    if k is None or k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


def stratified_split(labels: Sequence[Hashable], sizes: Callable[[int], Sequence[int]], seed: int) -> list[np.ndarray]:
    """Seeded per-class split of indices: ``sizes(n_class)`` gives the leading parts, the rest is the last.

    ``lambda n: [round(0.1 * n)]`` -> ``[val, train]``; ``lambda n: [10, 20]`` -> ``[train, val, rest]``.
    Parts are sorted, so batches follow file order until the train loader shuffles.
    """
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    if labels_arr.size == 0:
        raise ValueError("cannot split an empty dataset")
    per_class = []
    for label in sorted(set(labels_arr.tolist()), key=str):
        members = rng.permutation(np.flatnonzero(labels_arr == label))
        bounds = np.cumsum(list(sizes(len(members))))
        if bounds[-1] > len(members):
            raise ValueError(f"class {label!r} has {len(members)} samples, needs at least {bounds[-1]}")
        per_class.append(np.split(members, bounds))
    return [np.sort(np.concatenate(part)) for part in zip(*per_class, strict=True)]


def fraction_split(labels: Sequence[Hashable], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified ``(train, val)`` indices; every class with >= 2 samples keeps >= 1 on each side."""
    val, train = stratified_split(labels, lambda n: [min(max(round(n * fraction), 1), n - 1)], seed)
    return train, val


class ClassificationDataModule(pl.LightningDataModule):
    """Loaders and setup bookkeeping; subclasses implement ``_build`` to produce the splits and class names.

    ``setup`` is idempotent (Lightning calls it again after the user did), and ``num_classes``,
    ``class_names`` and ``label_mapping`` are valid once it has run.
    """

    modality: str  # the Preprocessing.modality this data module can feed

    def __init__(self, cfg: DataConfig, preprocessing: Preprocessing, seed: int) -> None:
        if preprocessing.modality != self.modality:
            raise ValueError(
                f"data '{cfg.name}' produces {self.modality} inputs but the backbone expects "
                f"{preprocessing.modality} inputs"
            )
        super().__init__()
        self.cfg = cfg
        self.preprocessing = preprocessing
        self.seed = seed
        self.class_names: list[str] = []
        self.label_mapping: dict[str, int] = {}
        self._splits: dict[str, Dataset] = {}
        self.collate_fn: Callable[[list[Any]], Any] | None = None  # None: torch's default_collate

    @property
    def num_classes(self) -> int:
        if not self.class_names:
            raise RuntimeError(f"{type(self).__name__}: call setup('fit') before reading num_classes")
        return len(self.class_names)

    def _build(self) -> tuple[dict[str, Dataset], list[str]]:  # pragma: no cover - abstract
        """Return ``{"train", "val"[, "test"]}`` datasets and the class names (index order).

        The train split must already be restricted to ``train_indices`` (done by the subclass, before any
        per-sample work such as tokenisation).
        """
        raise NotImplementedError

    def train_indices(self, n: int) -> np.ndarray:
        """Indices of the seeded ``max_train_samples`` subset of an ``n``-sample training split."""
        if self.cfg.max_train_samples is not None and self.cfg.max_train_samples > n:
            raise ConfigError(
                f"data.max_train_samples: {self.cfg.max_train_samples} asked, but the training split has only {n} "
                "examples; lower it or set it to null (all)"
            )
        return seeded_subset(n, self.cfg.max_train_samples, self.seed)

    def setup(self, stage: str | None = None) -> None:
        """Builds the splits once, and refuses data that cannot train a classifier before any compute."""
        if self._splits:
            return
        with blame(f"data ({self.cfg.name})"):
            splits, class_names = self._build()
        if len(class_names) < 2:
            raise ConfigError(
                f"data ({self.cfg.name}): the training data has {len(class_names)} class(es) {class_names}; "
                "a classifier needs at least 2 (check the label column)"
            )
        for split, dataset in splits.items():
            if len(dataset) == 0:
                raise ConfigError(f"data ({self.cfg.name}): the {split} split is empty")
        self.class_names = class_names
        self.label_mapping = {name: i for i, name in enumerate(self.class_names)}
        self._splits = splits

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        if not self._splits:
            raise RuntimeError(f"{type(self).__name__}: call setup() before requesting dataloaders")
        batch_size = self.cfg.batch_size if train else (self.cfg.eval_batch_size or self.cfg.batch_size)
        return DataLoader(
            self._splits[split],
            batch_size=batch_size,
            shuffle=train,
            num_workers=self.cfg.num_workers,
            persistent_workers=self.cfg.num_workers > 0,
            collate_fn=self.collate_fn,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        """The test split when the dataset has one, else the validation split."""
        return self._loader("test" if "test" in self._splits else "val")
