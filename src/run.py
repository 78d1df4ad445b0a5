"""The CLI: `python -m src.run [overrides]` (one run), `python -m src.run -m ...` (a grid or an Optuna sweep).

Hydra composes the config; `src.train` runs it. The heavy libraries (torch, Lightning, MLflow) are imported only
once the config has passed the torch-free checks (`src.config.validate`, `src.preflight.check_config`), so
`--help`, `--cfg job` and a config mistake answer at once.
"""

from __future__ import annotations

import os
import uuid

# MLflow draws a "Downloading artifacts" bar each time a model is logged (it reads back what it just wrote): noise
# among the run's log lines. Set at start-up, before anything imports MLflow, so every job and launcher worker
# process inherits it; a user's own value wins.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from src import preflight  # noqa: E402
from src.config import validate  # noqa: E402
from src.context import HydraContext, hydra_context  # noqa: E402
from src.errors import one_clear_answer  # noqa: E402

# `${uid:}` in conf/hydra: output folders unique even for runs started in the same second; cached in the config,
# so every job of a multirun (also in launcher worker processes) sees the same value.
OmegaConf.register_new_resolver("uid", lambda: uuid.uuid4().hex[:6], use_cache=True, replace=True)


def checked(raw: DictConfig, context: HydraContext) -> bool:
    """The torch-free checks, under the run's error handling: a mistake ends in one line and exit 2 (a multirun job
    only prints its line) without waiting for the heavy imports."""
    with one_clear_answer(context.output_dir, multirun=context.job_num is not None):
        OmegaConf.resolve(raw)
        preflight.check_config(validate(raw), context.launch_dir)
        return True
    return False


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(raw: DictConfig) -> float | list[float] | None:
    context = hydra_context()
    if not checked(raw, context):
        return None
    from src.train import execute

    return execute(raw, context)


if __name__ == "__main__":
    main()
