"""Data-module registry. Each option's schema is registered in `src.data.config`; its module loads when built."""

from src.data.config import DATA

__all__ = ["DATA"]
