"""Backbone registry. Each option's schema is registered in `src.backbones.config`; its module loads when built."""

from src.backbones.config import BACKBONES

__all__ = ["BACKBONES"]
