"""Name -> (factory, config schema) registries, so adding a backbone/dataset/strategy is one file + one YAML."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from omegaconf import OmegaConf

from src.schema import blame

T = TypeVar("T")


@dataclass
class Entry:
    factory: Callable[..., Any]
    schema: type


class Registry(Generic[T]):
    """A config group's options: each is a factory plus the dataclass that validates its YAML."""

    def __init__(self, group: str) -> None:
        self.group = group
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, schema: type) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.group} '{name}' is registered twice")
            self._entries[name] = Entry(factory, schema)
            return factory

        return decorator

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entry(self, name: str) -> Entry:
        if name not in self._entries:
            raise KeyError(f"unknown {self.group} '{name}'; registered: {', '.join(self.names())}")
        return self._entries[name]

    def config(self, node: Mapping[str, Any]) -> Any:
        """The node parsed into its option's schema dataclass (raises on unknown keys/bad types)."""
        schema = self.entry(node["name"]).schema
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        return OmegaConf.to_object(merged)

    def build(self, node: Mapping[str, Any], **kwargs: Any) -> T:
        """The option built from its validated config; what bad input makes it raise names the group."""
        cfg = self.config(node)
        with blame(f"{self.group} ({node['name']})"):
            return self.entry(node["name"]).factory(cfg, **kwargs)
