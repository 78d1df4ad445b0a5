"""`hydra/sweeper: optuna_study`: runs the selected `sweep=NAME` as an Optuna study (see src/sweep/study.py).

Hydra imports every module under `hydra_plugins` at start-up, for any app, so this one stays light: only the
Optuna-free schema is imported here; Optuna, MLflow and the rest of the project when a sweep starts.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from src.sweep.schema import SweepConfig


@dataclass
class OptunaStudySweeperConf:
    _target_: str = "hydra_plugins.optuna_study_sweeper.sweeper.OptunaStudySweeper"


@dataclass
class OptunaSweepBase:
    """`- /optuna_sweep` in a sweep file's defaults: this sweeper, and every `sweep.*` key with its default (so
    any of them can be overridden on the command line, e.g. sweep.storage=postgresql://...)."""

    defaults: list[Any] = field(default_factory=lambda: [{"override /hydra/sweeper": "optuna_study"}])
    sweep: SweepConfig = field(default_factory=SweepConfig)


ConfigStore.instance().store(
    group="hydra/sweeper", name="optuna_study", node=OptunaStudySweeperConf, provider="optuna_study_sweeper"
)
ConfigStore.instance().store(name="optuna_sweep", node=OptunaSweepBase, provider="optuna_study_sweeper")


class OptunaStudySweeper(Sweeper):
    """All settings live in the app config's `sweep` node (sweeps/NAME.yaml), not under hydra.sweeper."""

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        """The study's run; a bad sweep (search space, storage, sampler) ends in one line and exit 2."""
        from src.errors import one_clear_answer
        from src.sweep.study import StudySweep

        with one_clear_answer(Path(self.config.hydra.sweep.dir), multirun=False):
            return StudySweep(self.config, self.launcher, self.hydra_context.config_loader, arguments).run()
