"""Checks that need more than the schema but no compute: run right after validation, before any model, data or
MLflow run exists, so a mistake that is knowable up front costs seconds, not an epoch.

`check_config` is torch-free (the CLI runs it before importing the heavy libraries); `check_trainer` needs
Lightning and runs after that import, still before any compute.
"""

from __future__ import annotations

import inspect
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

from src.adapt.config import CRITERIA
from src.config import RunConfig, resolve_uri
from src.schema import ConfigError

TRACKING_TIMEOUT_S = 5.0


def check(cfg: RunConfig, launch_dir: Path) -> None:
    check_config(cfg, launch_dir)
    check_trainer(cfg.trainer)


def check_config(cfg: RunConfig, launch_dir: Path) -> None:
    """Everything knowable without Lightning."""
    check_objective(cfg)
    check_epochs(cfg.trainer)
    check_tracking(cfg.tracking.uri, cfg.tracking.artifact_location, launch_dir)
    check_cache(cfg.cache.dir, launch_dir)


def check_cache(directory: str | None, launch_dir: Path) -> None:
    """Every cache (features, tokenized tables, pretrained weights) lives under `cache.dir`: it must be a folder."""
    if directory is None:
        return
    path = Path(directory).expanduser()
    path = path if path.is_absolute() else launch_dir / path
    blocker = next((p for p in (path, *path.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ConfigError(f"cache.dir: {directory} is not a directory ({blocker} is a file)")


def check_objective(cfg: RunConfig) -> None:
    """The checkpoint monitor must be a metric the run logs; a typo would otherwise surface after epoch 1."""
    label_free = [m for m in CRITERIA.values() if m.startswith("val/target_")]  # logged when data has a target
    known = sorted([*(f"val/{name}" for name in cfg.task.METRICS), *label_free])
    if cfg.objective.metric not in known:
        raise ConfigError(
            f"objective.metric: {cfg.objective.metric!r} is never logged; choose one of {', '.join(known)} (the "
            f"metrics of task={cfg.task.name})"
        )


def check_epochs(kwargs: dict) -> None:
    epochs, steps = kwargs.get("max_epochs"), kwargs.get("max_steps", -1)
    if epochs is not None and epochs != -1 and epochs < 1:
        raise ConfigError(f"trainer.max_epochs: must be >= 1 (or -1 with trainer.max_steps > 0); got {epochs}")
    if epochs == -1 and (steps is None or steps < 1):
        raise ConfigError("trainer.max_epochs: -1 (unbounded) needs trainer.max_steps > 0")


def check_trainer(kwargs: dict) -> None:
    """Every key an argument of Lightning's `Trainer`, then a throwaway `Trainer` built from them: whatever
    Lightning would reject at fit time (an absent accelerator, an unknown precision or strategy) is rejected now."""
    import lightning.pytorch as pl  # ~10 s: only once the torch-free checks have passed

    allowed = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self", "callbacks", "logger"}
    if unknown := sorted(set(kwargs) - allowed):
        raise ConfigError(f"trainer.{unknown[0]}: not an argument of lightning.pytorch.Trainer")
    quiet = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # its "GPU available: ..." lines are printed by the real trainer
    try:
        pl.Trainer(**{**kwargs, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False})
    except Exception as e:  # noqa: BLE001 - ValueError, TypeError, Lightning's MisconfigurationException, ...
        raise ConfigError(f"trainer: {str(e).strip()}") from e
    finally:
        quiet.setLevel(level)


def _writable(path: Path) -> bool:
    """Whether `path` can be written: it exists and is writable, or its nearest existing parent is a writable
    folder."""
    if path.exists():
        return os.access(path, os.W_OK)
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    return parent.is_dir() and os.access(parent, os.W_OK)


def check_tracking(uri: str, artifact_location: str | None, launch_dir: Path) -> None:
    """A server must answer within a few seconds (MLflow's client would retry silently for minutes); a local
    store and artifact folder must be writable."""
    resolved = resolve_uri(uri, launch_dir)
    if resolved.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(resolved.rstrip("/") + "/health", timeout=TRACKING_TIMEOUT_S).close()
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ConfigError(
                f"tracking.uri: no MLflow server answers at {uri} within {TRACKING_TIMEOUT_S:g} s ({reason}); start "
                "it (mlflow server --host 127.0.0.1 --port 5000) or use tracking.uri=sqlite:///mlflow.db"
            ) from e
    for scheme in ("sqlite:///", "file:"):
        if resolved.startswith(scheme) and not _writable(Path(resolved[len(scheme) :])):
            raise ConfigError(f"tracking.uri: cannot write the MLflow store {resolved[len(scheme) :]} (from {uri})")
    if "://" not in resolved and not _writable(Path(resolved)):
        raise ConfigError(f"tracking.uri: cannot write the MLflow store {resolved} (from {uri})")
    if artifact_location and not _writable(Path(launch_dir, artifact_location)):
        raise ConfigError(f"tracking.artifact_location: cannot write {Path(launch_dir, artifact_location)}")
