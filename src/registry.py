"""Name -> (config schema, factory) registries, so adding a backbone/dataset/strategy is one file + one YAML.

Each option's schema is registered from a torch-free `config` module and names its factory as `"module:attr"`:
validating a config needs only the schemas, and `build()` imports the implementation on demand.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import import_module
from typing import Any, Generic, TypeVar

from omegaconf import OmegaConf

from src.schema import blame

T = TypeVar("T")
S = TypeVar("S", bound=type)


@dataclass
class Entry:
    schema: type
    factory: str  # "module:attr", imported when the option is built


class Registry(Generic[T]):
    """A config group's options: each is the dataclass that validates its YAML plus where its factory lives."""

    def __init__(self, group: str) -> None:
        self.group = group
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, factory: str) -> Callable[[S], S]:
        """Decorates the option's schema; `factory` ("module:attr") is imported only by `factory()`/`build()`."""

        def decorator(schema: S) -> S:
            if name in self._entries:
                raise ValueError(f"{self.group} '{name}' is registered twice")
            self._entries[name] = Entry(schema, factory)
            return schema

        return decorator

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entry(self, name: str) -> Entry:
        if name not in self._entries:
            raise KeyError(f"unknown {self.group} '{name}'; registered: {', '.join(self.names())}")
        return self._entries[name]

    def factory(self, name: str) -> Callable[..., T]:
        """The option's implementation, imported now (this is where torch & co. get loaded)."""
        module, attr = self.entry(name).factory.split(":")
        return getattr(import_module(module), attr)

    def config(self, node: Mapping[str, Any]) -> Any:
        """The node parsed into its option's schema dataclass (raises on unknown keys/bad types)."""
        schema = self.entry(node["name"]).schema
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        return OmegaConf.to_object(merged)

    def build(self, node: Mapping[str, Any], **kwargs: Any) -> T:
        """The option built from its validated config; what bad input makes it raise names the group."""
        cfg = self.config(node)
        factory = self.factory(node["name"])
        with blame(f"{self.group} ({node['name']})"):
            return factory(cfg, **kwargs)
