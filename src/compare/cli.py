"""`python -m src.compare [key=value ...]`: group runs, compare them with seed statistics, write and log a report.

Options are `key=value` like `src.run`'s overrides (lists as `by=[finetune,backbone]`); bad input prints one
line and exits 2. Heavy libraries load only once the options parse.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from omegaconf import OmegaConf

from src.schema import ConfigError

TRACKING_DEFAULTS = Path(__file__).resolve().parents[2] / "conf" / "tracking" / "mlflow.yaml"


def _tracking_default(key: str) -> str:
    """The run's own default (conf/tracking/mlflow.yaml), so compare reads where `src.run` writes."""
    return str(OmegaConf.load(TRACKING_DEFAULTS)[key])


@dataclass
class CompareSettings:
    uri: str = field(
        default="",
        metadata={"help": "MLflow tracking URI; default: the runs' default, sqlite:///mlflow.db in this directory"},
    )
    experiment: str = field(
        default="", metadata={"help": "MLflow experiment; default: the runs' default (transfer-lab)"}
    )
    sweep: str | None = field(
        default=None,
        metadata={"help": "children of this sweep or grid: parent run id or name, Optuna study, multirun folder"},
    )
    filter: str = field(
        default="",
        metadata={"help": "an MLflow search filter, e.g. \"tags.data = 'digits' and params.optim.lr = '0.003'\""},
    )
    metric: str | None = field(
        default=None,
        metadata={
            "help": "default: the runs' objective.metric (val/acc, ...); test/acc compares on test, "
            "test/<eval set>/acc on an eval set"
        },
    )
    direction: str | None = field(
        default=None, metadata={"help": "maximize | minimize; default: the runs' objective.direction"}
    )
    by: list[str] | None = field(
        default=None, metadata={"help": "grouping keys; default: the config values that vary (seed = replicate)"}
    )
    size: str | None = field(
        default=None,
        metadata={"help": "training-set size key; default: the first varying of data.max_train_per_class, ..."},
    )
    recommend: float | None = field(
        default=None, metadata={"help": "recommend strategies for this training-set size (in `size` units)"}
    )
    confidence: float = field(default=0.95, metadata={"help": "confidence level of every interval"})
    out: str | None = field(default=None, metadata={"help": "report folder; default reports/compare-<UTC time>"})
    log: bool = field(default=True, metadata={"help": "log the report to MLflow as its own run"})

    def __post_init__(self) -> None:
        self.uri = self.uri or _tracking_default("uri")
        self.experiment = self.experiment or _tracking_default("experiment")
        if self.direction not in (None, "maximize", "minimize"):
            raise ConfigError(f"direction: must be maximize or minimize; got {self.direction!r}")
        if not 0 < self.confidence < 1:
            raise ConfigError(f"confidence: must be in (0, 1); got {self.confidence}")


def _convert(key: str, text: str, default: object) -> object:
    if key == "by":
        items = [s.strip() for s in text.strip().strip("[]").split(",") if s.strip()]
        if not items:
            raise ConfigError("by: needs at least one key, e.g. by=[finetune,backbone]")
        return items
    if key == "log":
        if text.lower() not in ("true", "false"):
            raise ConfigError(f"log: must be true or false; got {text!r}")
        return text.lower() == "true"
    if key in ("recommend", "confidence"):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}: must be a number; got {text!r}") from None
    return text


def parse(overrides: list[str]) -> CompareSettings:
    known = {f.name: f.default for f in fields(CompareSettings)}
    values: dict[str, object] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"{item!r}: options are key=value; keys: {', '.join(known)}")
        if key not in known:
            raise ConfigError(f"{key}: unknown option; options: {', '.join(known)}")
        values[key] = _convert(key, text, known[key])
    return CompareSettings(**values)


def run(settings: CompareSettings, launch_dir: Path | None = None) -> tuple[Path, str | None]:
    """Select, compare, write the report (and log it); returns the folder and the report's MLflow run id."""
    # Imported here, so that --help and input errors answer at once (MLflow, matplotlib and scipy take seconds).
    from src.compare import report, shift
    from src.compare.analysis import compare, recommend
    from src.compare.runs import open_store, select
    from src.tracking.mlflow_run import resolve_uri

    base = launch_dir or Path.cwd()
    uri = resolve_uri(settings.uri, base)
    client = open_store(uri)
    maximize = None if settings.direction is None else settings.direction == "maximize"
    selection = select(client, settings.experiment, settings.sweep, settings.filter, settings.metric, maximize)
    comparison = compare(selection, settings.by, settings.size, settings.confidence)
    rec = recommend(comparison, settings.recommend) if settings.recommend is not None else None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out = Path(base, settings.out or f"reports/compare-{stamp}")
    title = f"Comparison: experiment `{settings.experiment}`" + (
        f", sweep `{settings.sweep}`" if settings.sweep else ""
    )
    report.build(comparison, out, title, rec, shift.analyse(comparison))
    print((out / "report.md").read_text(encoding="utf-8"))
    run_id = None
    if settings.log:
        logged = {f.name: str(getattr(settings, f.name)) for f in fields(settings) if f.name not in ("uri", "log")}
        run_id = report.log_run(client, comparison, out, f"compare-{stamp}", logged)
    print(
        f"Report written to {out}"
        + (f" and logged to MLflow run {run_id} (tag report=compare) at {uri}" if run_id else "")
    )
    return out, run_id


def main(argv: list[str] | None = None) -> int:
    fields_help = "\n".join(f"  {f.name:<11} {f.metadata['help']}" for f in fields(CompareSettings))
    parser = argparse.ArgumentParser(
        prog="python -m src.compare",
        description="Compare MLflow runs with seed statistics: groups, CIs, within-noise flags, transfer gain, plots.",
        epilog=f"options (key=value):\n{fields_help}\nexample: python -m src.compare by=[finetune] recommend=100",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", help="key=value options")
    args = parser.parse_args(argv)
    try:
        run(parse(args.overrides))
    except ConfigError as e:
        print(f"Invalid compare input: {e}", file=sys.stderr)
        return 2
    return 0
