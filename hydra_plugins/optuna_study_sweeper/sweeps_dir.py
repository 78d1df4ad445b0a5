"""The `sweep` config group read from a `sweeps/` folder beside the app's config folder.

`sweep=NAME` then selects `sweeps/NAME.yaml` (one file per sweep, kept apart from `conf/`), and
`sweep.storage=...` etc. override its keys like any config. Hydra has no way to mount a folder under
another group name, hence a small config source with its own scheme plus the plugin that adds it.
"""

import importlib.util
import os
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigLoadError, ConfigResult, ConfigSource
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import OmegaConf

GROUP = "sweep"
FOLDER = "sweeps"
SCHEME = "sweeps-dir"


class SweepsDirConfigSource(ConfigSource):
    """Serves `<path>/NAME.yaml` as `sweep/NAME` and nothing else."""

    @staticmethod
    def scheme() -> str:
        return SCHEME

    def _file(self, config_path: str) -> Path | None:
        group, _, name = config_path.partition("/")
        if group != GROUP or not name:
            return None
        return Path(self.path, self._normalize_file_name(name))

    def load_config(self, config_path: str) -> ConfigResult:
        path = self._file(config_path)
        if path is None or not path.is_file():
            raise ConfigLoadError(f"Config not found: {config_path}")
        text = path.read_text(encoding="utf-8")
        return ConfigResult(
            config=OmegaConf.create(text) if text.strip() else OmegaConf.create(),
            path=self.full_path(),
            provider=self.provider,
            header=ConfigSource._get_header_dict(text[:512]),
        )

    def available(self) -> bool:
        return Path(self.path).is_dir()

    def is_group(self, config_path: str) -> bool:
        return config_path in ("", GROUP) and self.available()

    def is_config(self, config_path: str) -> bool:
        path = self._file(config_path)
        return path is not None and path.is_file()

    def list(self, config_path: str, results_filter: ObjectType | None) -> list[str]:
        if config_path == "":
            return [GROUP] if results_filter in (None, ObjectType.GROUP) else []
        if config_path != GROUP or results_filter == ObjectType.GROUP:
            return []
        return sorted(p.stem for p in Path(self.path).glob("*.yaml"))


def config_dir(search_path_entry: str) -> Path | None:
    """The folder behind a plain, `file://` or `pkg://` search path entry (None if it cannot be located)."""
    scheme, sep, rest = search_path_entry.partition("://")
    if not sep:
        return Path(search_path_entry)
    if scheme == "file":
        return Path(rest)
    if scheme == "pkg":
        spec = importlib.util.find_spec(rest.replace("/", "."))
        locations = list(spec.submodule_search_locations or []) if spec else []
        return Path(locations[0]) if locations else None
    return None


class SweepsDirSearchPathPlugin(SearchPathPlugin):
    """Adds `<app config dir>/../sweeps` (when it exists) as the `sweep` group; other apps are untouched."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for entry in list(search_path.get_path()):
            if entry.provider != "main":
                continue
            conf = config_dir(entry.path)
            sweeps = conf.parent / FOLDER if conf else None
            if sweeps is not None and sweeps.is_dir():
                search_path.append(provider="sweeps", path=f"{SCHEME}://{os.path.abspath(sweeps)}")
