"""Data-module registry. Each module below registers one LightningDataModule with its config schema."""

import lightning.pytorch as pl

from src.registry import Registry

DATA: Registry[pl.LightningDataModule] = Registry("data")

from src.data import digits, image_folder, image_manifest, text_table  # noqa: E402,F401

__all__ = ["DATA"]
