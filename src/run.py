"""The CLI: `python -m src.run [overrides]` (one run), `python -m src.run -m ...` (a grid or an Optuna sweep).

Hydra composes the config; `src.train` runs it. The heavy libraries (torch, Lightning, MLflow) are imported only
when a run starts, so `--help` and `--cfg job` answer at once.
"""

from __future__ import annotations

import uuid

import hydra
from omegaconf import DictConfig, OmegaConf

# `${uid:}` in conf/hydra: output folders unique even for runs started in the same second; cached in the config,
# so every job of a multirun (also in launcher worker processes) sees the same value.
OmegaConf.register_new_resolver("uid", lambda: uuid.uuid4().hex[:6], use_cache=True, replace=True)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(raw: DictConfig) -> float | list[float] | None:
    from src.train import execute

    return execute(raw)


if __name__ == "__main__":
    main()
