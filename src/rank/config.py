"""`python -m src.rank`'s settings and the transferability scores' schemas (torch-free, so bad input is answered
in about a second, before any backbone is built).

A score is one function in `src.rank.scores` (`fn(cfg, features) -> float`, higher is better) plus its schema here,
registered in `SCORES`: the schema's fields are the score's knobs, `tasks` the tasks it applies to, and
`needs_source` whether it reads the backbone's source classifier head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from src.registry import Registry
from src.schema import ConfigError

SCORES: Registry[float] = Registry("score")
ALL_TASKS = ("classification", "multilabel", "regression")
CLASSES = ("classification",)
PRESETS = Path(__file__).resolve().parents[2] / "conf" / "rank"
TRACKING_DEFAULTS = Path(__file__).resolve().parents[2] / "conf" / "tracking" / "mlflow.yaml"


@SCORES.register("logme", "src.rank.scores:logme_score")
@dataclass
class LogMEConfig:
    name: str = "logme"
    tasks: ClassVar[tuple[str, ...]] = ALL_TASKS
    needs_source: ClassVar[bool] = False


@SCORES.register("hscore", "src.rank.scores:hscore_score")
@dataclass
class HScoreConfig:
    name: str = "hscore"
    shrink: bool = True  # Ledoit-Wolf shrinkage of cov(f) (Ibrahim et al. 2022); false: the plain H-score
    tasks: ClassVar[tuple[str, ...]] = CLASSES
    needs_source: ClassVar[bool] = False


@SCORES.register("knn", "src.rank.scores:knn_score")
@dataclass
class KNNConfig:
    name: str = "knn"
    k: int = 5  # neighbours (cosine); few-shot sets have 10 examples per class
    tasks: ClassVar[tuple[str, ...]] = ("classification", "regression")
    needs_source: ClassVar[bool] = False


@SCORES.register("linear", "src.rank.scores:linear_score")
@dataclass
class LinearConfig:
    name: str = "linear"
    ridge: list[float] = field(default_factory=lambda: [1e-3, 1e-2, 1e-1, 1.0, 10.0])  # x N, standardised features
    tasks: ClassVar[tuple[str, ...]] = ("classification", "regression")
    needs_source: ClassVar[bool] = False


@dataclass
class SourceScoreConfig:
    name: str = "nce"
    tasks: ClassVar[tuple[str, ...]] = CLASSES
    needs_source: ClassVar[bool] = True


SCORES.register("nce", "src.rank.scores:nce_score")(SourceScoreConfig)
SCORES.register("leep", "src.rank.scores:leep_score")(SourceScoreConfig)


def score_schema(name: str) -> Any:
    return SCORES.entry(name).schema


def _tracking_default(key: str) -> str:
    """`src.run`'s own default (conf/tracking/mlflow.yaml): rank logs where the runs it predicts are."""
    return str(OmegaConf.load(TRACKING_DEFAULTS)[key])


@dataclass
class RankSettings:
    """What to rank, on what, and where the measured runs are. A preset (`conf/rank/<name>.yaml`) sets any of these;
    `key=value` options on the command line override it."""

    preset: str | None = field(default=None, metadata={"help": "conf/rank/<preset>.yaml, or a path to such a YAML"})
    overrides: list[str] = field(
        default_factory=list, metadata={"help": "src.run overrides every candidate shares: data, task, seed, ..."}
    )
    candidates: dict[str, list[str]] = field(
        default_factory=dict, metadata={"help": "candidates.NAME=[overrides]: backbone=..., backbone.depth=..., ..."}
    )
    scores: list[str] | None = field(
        default=None, metadata={"help": f"some of {', '.join(SCORES.names())}; default: every one that applies"}
    )
    uri: str = field(default="", metadata={"help": "MLflow store; default: src.run's (sqlite:///mlflow.db here)"})
    experiment: str = field(default="", metadata={"help": "where the rank runs go; default: src.run's experiment"})
    measured: str | None = field(
        default=None, metadata={"help": "experiment of the runs to check the ranking against; default: experiment"}
    )
    filter: str = field(
        default="", metadata={"help": "an MLflow filter on the measured runs, e.g. \"params.optim.lr = '0.01'\""}
    )
    metric: str | None = field(
        default=None, metadata={"help": "measured metric; default: the runs' objective (best val value); test/..."}
    )
    examples: int | None = field(
        default=None,
        metadata={"help": "score a seeded random subset of this many training examples; default: all of them"},
    )
    resamples: int = field(default=1000, metadata={"help": "bootstrap resamples of the runs (tau/rho intervals)"})
    confidence: float = field(default=0.95, metadata={"help": "confidence level of every interval"})
    out: str | None = field(default=None, metadata={"help": "report folder; default reports/rank-<UTC time>"})

    def __post_init__(self) -> None:
        self.uri = self.uri or _tracking_default("uri")
        self.experiment = self.experiment or _tracking_default("experiment")
        self.measured = self.measured or self.experiment
        if len(self.candidates) < 2:
            raise ConfigError(
                f"candidates: ranking needs at least 2 candidates; got {len(self.candidates)} "
                "(a preset, or candidates.NAME=[backbone=...])"
            )
        for name, overrides in self.candidates.items():
            if not overrides:
                raise ConfigError(f"candidates.{name}: no overrides; give its backbone, e.g. [backbone=minilm]")
        unknown = [s for s in self.scores or [] if s not in SCORES.names()]
        if unknown:
            raise ConfigError(f"scores: unknown score {unknown[0]!r}; registered: {', '.join(SCORES.names())}")
        if self.scores is not None and not self.scores:
            raise ConfigError("scores: empty list; name at least one, or leave it unset for every score")
        if self.examples is not None and self.examples < 10:
            raise ConfigError(f"examples: must be >= 10 or null (every training example); got {self.examples}")
        if self.resamples < 100:
            raise ConfigError(f"resamples: must be >= 100; got {self.resamples}")
        if not 0 < self.confidence < 1:
            raise ConfigError(f"confidence: must be in (0, 1); got {self.confidence}")


def preset_path(preset: str) -> Path:
    path = Path(preset)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    named = PRESETS / f"{preset}.yaml"
    if not named.is_file():
        known = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
        raise ConfigError(f"preset: no conf/rank/{preset}.yaml (and no such YAML file); presets: {known}")
    return named


def parse(args: list[str]) -> RankSettings:
    """`key=value` options (OmegaConf dot-list syntax: lists as [a,b], `candidates.NAME=[...]`) over the preset."""
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"{arg!r}: options are key=value, e.g. preset=digits_sources")
    try:
        given = OmegaConf.from_dotlist(args)
    except OmegaConfBaseException as e:
        raise ConfigError(f"options: {str(e).splitlines()[0]}") from None
    layers = [OmegaConf.structured(RankSettings)]  # the class: its defaults, without __post_init__
    if given.get("preset"):
        layers.append(OmegaConf.load(preset_path(str(given.preset))))
    layers.append(given)
    try:
        merged = OmegaConf.merge(*layers)
        return RankSettings(**OmegaConf.to_container(merged, resolve=True))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "options"
        raise ConfigError(f"{key}: {str(getattr(e, 'msg', e)).splitlines()[0]}") from None
    except TypeError as e:
        raise ConfigError(f"options: {e}") from None
