"""What `src.evaluate` and `src.predict` share: `key=value` arguments (Hydra's override style, without Hydra's
start-up cost), finding a run's model, and reading raw inputs from a table file or an image folder.

Heavy libraries are imported inside the functions, so `--help` answers at once.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from src.schema import ConfigError

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from src.serving.model import TrainedModel

RUN_FILE = "run.json"  # src.tracking.resume.RUN_FILE: the run an output folder belongs to


def parse(argv: list[str], keys: dict[str, str], usage: str, prefixes: tuple[str, ...] = ()) -> dict[str, str]:
    """`key=value` arguments; `keys` maps each allowed key to its help line, `prefixes` allows `prefix.<any>`.
    `-h/--help` prints the usage and the keys and exits 0."""
    if any(a in ("-h", "--help") for a in argv):
        print(usage.strip() + "\n\narguments:")
        for key, text in keys.items():
            print(f"  {key:<20} {text}")
        sys.exit(0)
    out: dict[str, str] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ConfigError(f"{arg!r}: arguments are key=value; valid keys: {', '.join(keys)} (see --help)")
        if key not in keys and not key.startswith(prefixes):
            raise ConfigError(f"{key}: unknown argument; valid keys: {', '.join(keys)} (see --help)")
        out[key] = value
    return out


def require(args: dict[str, str], key: str) -> str:
    if not args.get(key):
        raise ConfigError(f"{key}: required (see --help)")
    return args[key]


def tracking_client(args: dict[str, str]) -> MlflowClient:
    """The store given by `tracking.uri` (default: the runs' own default, ./mlflow.db)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow.tracking import MlflowClient

    from src.config import TrackingConfig
    from src.tracking import resolve_uri

    return MlflowClient(resolve_uri(args.get("tracking.uri") or TrackingConfig().uri, Path.cwd()))


def _run_of_checkpoint(path: Path) -> str:
    """A checkpoint in a run's output folder (`<output>/checkpoints/x.ckpt`) names its run in `run.json`."""
    import json

    for folder in (path.parent, path.parent.parent):
        if (folder / RUN_FILE).is_file():
            return json.loads((folder / RUN_FILE).read_text())["run_id"]
    raise ConfigError(
        f"run: cannot tell which run wrote {path} (no {RUN_FILE} beside it); pass run=<run id> checkpoint={path}"
    )


def load_classifier(
    source: str, client: MlflowClient, checkpoint: str | None = None
) -> tuple[TrainedModel, str | None]:
    """The model of `source` (a run id, a checkpoint file of a run, a `runs:/`/`models:/` URI or a local model
    folder), optionally with the weights of `checkpoint`; and the id of the run it came from (if any)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from src.serving.export import MODEL_NAME

    path = Path(source).expanduser()
    if path.is_file():
        source, checkpoint = _run_of_checkpoint(path), checkpoint or str(path)
    run_id = None
    if path.is_dir():
        uri = str(path)
    elif ":/" in source:
        uri = source
        run_id = source.split("/")[1] if source.startswith("runs:/") else None
    else:
        try:
            run_id = client.get_run(source).info.run_id
        except MlflowException:
            raise ConfigError(f"run: no run {source!r} in {client.tracking_uri} (set tracking.uri=...)") from None
        uri = f"runs:/{run_id}/{MODEL_NAME}"
    try:
        with _tracking_uri(client.tracking_uri):
            model = mlflow.pyfunc.load_model(uri)
    except (MlflowException, OSError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        hint = " (it ran with tracking.log_model=false, or before runs logged models)" if run_id else ""
        raise ConfigError(f"run: no loadable model at {uri}{hint}: {detail}") from None
    classifier = model.unwrap_python_model().classifier
    if checkpoint:
        load_checkpoint(classifier, Path(checkpoint))
    return classifier, run_id or classifier.spec.source_run_id


class _tracking_uri:  # noqa: N801 - used like a function
    """MLflow's URI resolution (`runs:/`, `models:/`) reads the global tracking URI: point it at `uri` meanwhile."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def __enter__(self) -> None:
        import mlflow

        self.previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(self.uri)

    def __exit__(self, *exc: object) -> None:
        import mlflow

        mlflow.set_tracking_uri(self.previous)


def load_checkpoint(classifier: TrainedModel, path: Path) -> None:
    """Replace the model's weights by a training checkpoint's (`backbone.*`, `head.*` keys)."""
    import torch

    from src.module import load_part

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        checkpoint["state_dict"]
    except (OSError, KeyError, RuntimeError) as e:
        raise ConfigError(f"checkpoint: cannot read weights from {path}: {e}") from None
    for name in ("backbone", "head"):
        try:
            load_part(getattr(classifier, name), checkpoint, name)
        except RuntimeError as e:
            first = str(e).splitlines()[0]
            raise ConfigError(f"checkpoint: {path} does not fit the run's model ({name}): {first}") from None


def read_inputs(source: str, classifier: TrainedModel, label_column: str | None = None) -> pd.DataFrame:
    """A table file (CSV/TSV/JSON lines) as a DataFrame, or an image folder (`<dir>/<class>/<image>`, or loose
    images) as `image` paths plus, when there are class sub-folders, their names under `label_column`."""
    import pandas as pd

    from src.data.image_folder import scan_folder
    from src.data.tables import read_table

    path = Path(source).expanduser()
    if path.is_dir():
        if classifier.spec.input.modality != "image":
            raise ConfigError(f"{source}: a folder holds images, but this model classifies text; give a table file")
        extensions = ["jpg", "jpeg", "png", "bmp", "gif", "webp"]
        if any(p.is_dir() for p in path.iterdir()):
            _, files, classes = scan_folder("data", path, extensions)
            return pd.DataFrame({"image": [str(f) for f in files], label_column or "label": classes})
        files = sorted(str(p) for p in path.iterdir() if p.suffix.lower().lstrip(".") in extensions)
        return pd.DataFrame({"image": files})
    if not path.is_file():
        raise ConfigError(f"{source}: no such file or folder (relative paths resolve against {Path.cwd()})")
    raw = read_table("input", path)
    frame = pd.DataFrame({name: raw.column(name) for name in raw.columns})
    classifier.check_columns(frame)
    return frame


def main_guard(body: Callable[[list[str]], Any]) -> None:
    """Run a CLI body with the project's error path: one line on screen, exit 2 for bad input (src.errors)."""
    import shutil
    import tempfile

    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        body(sys.argv[1:])  # prints the help before any heavy import
    from src.errors import one_clear_answer

    folder = Path(tempfile.mkdtemp(prefix="transfer-lab-cli-"))
    with one_clear_answer(folder, multirun=False):
        body(sys.argv[1:])
    shutil.rmtree(folder, ignore_errors=True)
