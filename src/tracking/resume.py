"""Resume continues the same run: the same MLflow run (metrics go on at the right epoch, it ends FINISHED), the same
output folder, from its last checkpoint, with the config the run was started with.

Two ways in: `resume=<run id>` or `resume=last` (the newest stopped or failed run of the experiment), and
automatically when a job starts again in an output folder that already holds a run (a SLURM requeue re-runs the
same job in the same folder), which `run.json` there records.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from src.schema import ConfigError
from src.tracking.liveness import is_alive
from src.tracking.mlflow_run import resolve_uri

RUN_FILE = "run.json"
LAST_CHECKPOINT = Path("checkpoints", "last.ckpt")
CONFIG_ARTIFACT = "config.yaml"


@dataclass
class ResumePoint:
    run_id: str
    output_dir: Path
    checkpoint: Path


def record(output_dir: Path, run_id: str) -> None:
    """Written when a run starts: what a job restarted in the same folder resumes."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / RUN_FILE).write_text(json.dumps({"run_id": run_id}))


def requeued(output_dir: Path) -> ResumePoint | None:
    """The run an earlier start of this very job left in `output_dir`, if it saved a checkpoint."""
    run_file, checkpoint = output_dir / RUN_FILE, output_dir / LAST_CHECKPOINT
    if not (run_file.is_file() and checkpoint.is_file()):
        return None
    return ResumePoint(json.loads(run_file.read_text())["run_id"], output_dir, checkpoint)


def _find_run(client: MlflowClient, experiment: str, which: str, uri: str) -> str:
    """A run id as given (a run is found by id in any experiment), or the experiment's newest stopped run."""
    if which != "last":
        return which
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ConfigError(f"resume=last: no experiment {experiment!r} in {uri} (tracking.experiment)")
    stopped = [RunStatus.to_string(s) for s in (RunStatus.KILLED, RunStatus.FAILED)]
    for run in client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"], max_results=100):
        output_dir = run.data.tags.get("output_dir")
        if run.info.status in stopped and output_dir and (Path(output_dir) / LAST_CHECKPOINT).is_file():
            return run.info.run_id
    raise ConfigError(f"resume=last: no stopped or failed run with a checkpoint in experiment {experiment!r}")


def point(resume: str, experiment: str, uri: str, launch_dir: Path) -> tuple[ResumePoint, DictConfig]:
    """The run named by `resume` (id or `last`), where it stopped, and the config it was started with."""
    resolved = resolve_uri(uri, launch_dir)
    client = MlflowClient(resolved)
    run_id = _find_run(client, experiment, resume, uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"resume: no run {run_id!r} in {uri}") from None
    status = run.info.status
    if status == RunStatus.to_string(RunStatus.FINISHED):
        raise ConfigError(f"resume: run {run_id} already FINISHED; nothing to resume")
    if status == RunStatus.to_string(RunStatus.RUNNING) and is_alive(run.data.tags):
        raise ConfigError(f"resume: run {run_id} is still RUNNING (process {run.data.tags.get('process.pid')})")
    output_dir = Path(run.data.tags.get("output_dir", ""))
    checkpoint = output_dir / LAST_CHECKPOINT
    if not checkpoint.is_file():
        raise ConfigError(
            f"resume: run {run_id} has no checkpoint at {checkpoint} (it stopped before saving one); start it again"
        )
    config = OmegaConf.load(client.download_artifacts(run_id, CONFIG_ARTIFACT))
    return ResumePoint(run_id, output_dir, checkpoint), config


def with_overrides(config: DictConfig, overrides: list[str]) -> DictConfig:
    """The stored config with the `key.sub=value` overrides given beside `resume=` (e.g. trainer.max_epochs=20 to
    train longer); choosing another config group would make it another run."""
    dotlist = [o for o in overrides if not o.startswith("resume=")]
    groups = [o for o in dotlist if "." not in o.split("=", 1)[0]]
    if groups:
        raise ConfigError(f"resume: a resumed run keeps its config groups; cannot apply {groups} (start a new run)")
    return OmegaConf.merge(config, OmegaConf.from_dotlist([o.lstrip("+") for o in dotlist]))
