"""Every multirun is grouped: a grid (`-m finetune=a,b,c seed=0,1`) gets a parent MLflow run, like an Optuna sweep
does, that holds the grid's definition and, at the end, a summary table of its children and the best of them; the
terminal then says where everything went.

A Hydra callback (`hydra.callbacks` in conf/hydra/default.yaml) opens the parent before the first job and writes
`multirun.json` into the sweep folder; each job reads it to nest under the parent and name itself by what varies
across the grid. Files, not process state, so every launcher (basic, joblib, submitit/SLURM) behaves the same.
Optuna sweeps have their own parent (src/sweep/tracking.py) and are left alone here.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

INFO_FILE = "multirun.json"
ROLE_TAG = "role"  # "grid" on a grid's parent run; RANK_ROLE on src.rank's runs
RANK_ROLE = "rank"  # a ranking's parent and candidate runs: they score backbones, never train; never compared


@dataclass
class MultirunInfo:
    parent_run_id: str
    varying: list[str]  # the override keys the grid sweeps over


def read(multirun_dir: str | None) -> MultirunInfo | None:
    if multirun_dir is None or not (path := Path(multirun_dir, INFO_FILE)).is_file():
        return None
    return MultirunInfo(**json.loads(path.read_text()))


def beaten(client: Any, parent_run_id: str, metric: str, direction: str, value: float) -> bool:
    """Whether a finished child of the grid's parent scored better than `value` on `metric` (its best value, as
    `src.run` logs it), so this job need not keep its weights. Read from the store: every launcher sees it."""
    parent = client.get_run(parent_run_id)
    siblings = client.search_runs(
        [parent.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'FINISHED'",
    )
    sign = 1.0 if direction == "maximize" else -1.0
    return any(sign * r.data.metrics[metric] > sign * value for r in siblings if metric in r.data.metrics)


def grid_dimensions(overrides: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """The command line's overrides split into swept (`finetune=a,b`) and fixed ones, as key -> text."""
    swept, fixed = {}, {}
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.is_delete():
            continue
        key = override.get_key_element().lstrip("+~")
        (swept if override.is_sweep_override() else fixed)[key] = override.input_line.split("=", 1)[1]
    return swept, fixed


class GridParent(Callback):
    """Opens the grid's parent run at multirun start; closes it with the summary at multirun end."""

    def __init__(self) -> None:
        self.run: Any = None
        self.objective: dict[str, str] = {}

    def __getstate__(self) -> dict[str, Any]:
        """Launcher workers (joblib) get a copy of Hydra's callbacks: without the open run (a client with locks,
        which cannot be pickled); a job finds its parent in the multirun folder's INFO_FILE."""
        return {**self.__dict__, "run": None}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if "optuna_study" in str(OmegaConf.select(config, "hydra.sweeper._target_", default="")):
            return
        from src.config import TrackingConfig
        from src.tracking import naming
        from src.tracking.mlflow_run import MLflowRun, source_tags

        in_file = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}  # a sweep file's grid
        swept, fixed = grid_dimensions([f"{k}={v}" for k, v in in_file.items()] + list(config.hydra.overrides.task))
        tracking = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrackingConfig), config.tracking))
        tracking.parent_run_id, tracking.run_name = None, None
        sweep_dir = Path(config.hydra.runtime.cwd, config.hydra.sweep.dir)
        name = naming.SEP.join(["grid", *(f"{k}={v}" for k, v in swept.items())])
        tags = {
            ROLE_TAG: "grid",
            "multirun_dir": str(sweep_dir),
            **source_tags("python -m src.run -m " + " ".join(config.hydra.overrides.task)),
        }
        self.objective = {"metric": config.objective.metric, "direction": config.objective.direction}
        self.run = MLflowRun(tracking, Path(config.hydra.runtime.cwd), name, tags).__enter__()
        self.run.log_params({f"grid.{k}": v for k, v in swept.items()} | {f"fixed.{k}": v for k, v in fixed.items()})
        sweep_dir.mkdir(parents=True, exist_ok=True)
        info = {"parent_run_id": self.run.run_id, "varying": sorted(swept)}
        (sweep_dir / INFO_FILE).write_text(json.dumps(info))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.run is None:
            return
        from src.tracking.summary import summarize_children

        failed = summarize_children(self.run, self.objective["metric"], self.objective["direction"])
        self.run.__exit__(None, None, None)
        if failed:
            sys.exit(1)
