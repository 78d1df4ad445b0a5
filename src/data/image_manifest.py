"""Images listed in a table (a manifest): an image path column plus the label column(s), which is how most
multi-label and regression image sets ship (and classification sets without class folders). The task reads the
labels as it does for text tables (classes, tag lists or 0/1 columns, numbers); decoding, caching and
augmentation are image_folder's.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from torch.utils.data import Dataset

from src.data.config import ImageManifestConfig, label_columns, read_label_names
from src.data.image_folder import ImageFolderDataModule, shorter_side
from src.data.tables import listed, read_table
from src.schema import ConfigError
from src.tasks.base import LabelFormat

if TYPE_CHECKING:
    from src.tasks.base import Cell


class ImageManifestDataModule(ImageFolderDataModule):
    """``train_path``/``val_path``/``test_path`` manifests; outputs are what the task learns from the train labels."""

    cfg: ImageManifestConfig

    def _rows(self, key: str, path: str | None = None) -> tuple[list[Path], list[Cell], list[int], str]:
        """A manifest's image files, label cells and file lines (config key ``key``, or ``path`` when the key is
        not a field), without the rows whose image is missing or unreadable or (unless the task allows it) whose
        label is empty: an error, or skipped with one warning."""
        cfg, path = self.cfg, Path(path or getattr(self.cfg, key))
        raw = read_table(key, path, cfg.format, encoding=cfg.encoding, bad_rows=cfg.bad_rows)
        for message in raw.warnings:
            warnings.warn(message, UserWarning, stacklevel=2)
        root = Path(cfg.image_root) if cfg.image_root is not None else path.parent
        names = raw.column(cfg.image_column, " (set data.image_column)")
        files = [root / str(name).strip() if name not in (None, "") else None for name in names]
        cells = raw.label_cells(label_columns(cfg.label_column), " (set data.label_column)")
        sides = [shorter_side(f) if f is not None and f.suffix.lower() in cfg.suffixes() else None for f in files]
        problems = {
            "no image path": [i for i, f in enumerate(files) if f is None],
            "a missing image file": [i for i, f in enumerate(files) if f is not None and not f.is_file()],
            "a file that is not an image Pillow can open": [
                i
                for i, (f, s) in enumerate(zip(files, sides, strict=True))
                if f is not None and f.is_file() and s is None
            ],
            "no label": [] if self.task.empty_label else [i for i, c in enumerate(cells) if c is None],
        }
        where = raw.where
        if bad := sorted(set().union(*problems.values())):
            detail = "; ".join(
                f"{what} on line(s) {listed([raw.lines[i] for i in rows])}" for what, rows in problems.items() if rows
            )
            if cfg.bad_rows == "error":
                raise ConfigError(
                    f"{where}: {len(bad)} row(s) with {detail} (images under {root}); fix them or set bad_rows: skip"
                )
            warnings.warn(f"{where}: skipped {len(bad)} row(s) with {detail} (bad_rows: skip)", UserWarning, 2)
        keep = np.setdiff1d(np.arange(len(files)), bad)
        if small := [files[i] for i in keep if sides[i] < self.image_size]:
            warnings.warn(
                f"{where}: {len(small)} image(s) have a shorter side below {self.image_size} px and are upscaled: "
                + ", ".join(str(p) for p in small[:3]),
                UserWarning,
                2,
            )
        return [files[i] for i in keep], [cells[i] for i in keep], [raw.lines[i] for i in keep], where

    def _build(self) -> tuple[dict[str, Dataset], list[str]]:
        cfg = self.cfg
        names = read_label_names("label_names", cfg.label_names) if cfg.label_names is not None else None
        fmt = LabelFormat(label_columns(cfg.label_column), names, cfg.label_base, cfg.label_separator, cfg.bad_rows)
        train = self._rows("train_path")
        codec = self.task.codec(train[1], fmt, train[3])

        def labelled(rows: tuple[list[Path], list[Cell], list[int], str]) -> tuple[list[Path], np.ndarray]:
            files, cells, lines, where = rows
            keep, targets = codec.encode(cells, lines, where)
            return [files[i] for i in keep], targets

        files, targets = labelled(train)
        strata = self.task.strata(targets)
        if cfg.val_path is None:
            train_idx, val_idx = self.val_split(strata, cfg.val_fraction)
            val = self._dataset([files[i] for i in val_idx], targets[val_idx], train=False)
        else:
            train_idx = self.train_indices(strata)
            val = self._dataset(*labelled(self._rows("val_path")), train=False)
        splits: dict[str, Dataset] = {
            "train": self._dataset([files[i] for i in train_idx], targets[train_idx], train=True),
            "val": val,
        }
        if cfg.test_path is not None:
            splits["test"] = self._dataset(*labelled(self._rows("test_path")), train=False)

        def eval_set(name: str, key: str, path: str) -> Dataset:
            return self._dataset(*labelled(self._rows(key, path)), train=False)

        return {**splits, **self.eval_splits(splits, eval_set)}, codec.names
