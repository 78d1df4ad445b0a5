"""Where a run was launched from and which multirun job it is: read from Hydra without importing any heavy
library, so the CLI can report a config mistake in its output folder before torch is loaded."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode


@dataclass
class HydraContext:
    launch_dir: Path
    output_dir: Path
    multirun_dir: str | None
    job_num: int | None
    overrides: list[str]
    choices: dict[str, str]  # config-group options picked, e.g. {"data": "sst2"}: the names users know


def hydra_context() -> HydraContext:
    """Where the user launched from and which multirun job this is (plain defaults outside Hydra)."""
    if not HydraConfig.initialized():
        cwd = Path.cwd()
        return HydraContext(cwd, Path(tempfile.mkdtemp(prefix="run-")), None, None, [], {})
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    return HydraContext(
        launch_dir=Path(hc.runtime.cwd),
        output_dir=Path(hc.runtime.output_dir),
        multirun_dir=str(Path(hc.runtime.cwd, hc.sweep.dir)) if multirun else None,
        job_num=hc.job.num if multirun else None,
        overrides=list(hc.overrides.task),
        choices={k: str(v) for k, v in hc.runtime.choices.items() if v is not None},
    )
