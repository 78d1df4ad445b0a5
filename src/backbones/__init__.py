"""Backbone registry. Each module below registers one backbone family with its config schema."""

from src.backbones.base import Backbone, LayerGroup, Preprocessing
from src.registry import Registry

BACKBONES: Registry[Backbone] = Registry("backbone")

# Importing the modules registers them.
from src.backbones import efficientnet_lite, hf, minilm, small_cnn, timm  # noqa: E402,F401

__all__ = ["BACKBONES", "Backbone", "LayerGroup", "Preprocessing"]
