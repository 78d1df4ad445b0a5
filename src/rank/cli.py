"""`python -m src.rank [key=value ...]`: score candidate backbones on one data set from the cached frozen features
of its training split, log each as an MLflow run under one parent, and check the ranking against measured runs.

Everything that can be wrong with the input (options, a candidate's overrides, a score that does not apply) is
answered in one line with exit status 2 before torch is imported; a candidate that then fails to build or encode
is reported and skipped, and the rest are still ranked.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, fields
from pathlib import Path

from omegaconf import DictConfig

from src.config import RunConfig, validate
from src.preflight import check_config
from src.rank.config import SCORES, RankSettings, parse, score_schema
from src.schema import ConfigError

CONF = Path(__file__).resolve().parents[2] / "conf"


@dataclass
class Candidate:
    """A candidate backbone: its name, the `src.run` overrides that make it, and the composed, validated config."""

    name: str
    overrides: list[str]
    raw: DictConfig
    cfg: RunConfig


def compose(overrides: list[str]) -> DictConfig:
    """The config `python -m src.run <overrides>` would run (Hydra's compose API over conf/)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            raw = hydra_compose("config", overrides=overrides)
        OmegaConf.resolve(raw)
        return raw
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        raise ConfigError(" ".join(str(e).split())) from None


def candidates(settings: RankSettings, launch_dir: Path) -> list[Candidate]:
    """Every candidate composed from the shared overrides then its own, validated as `src.run` would."""
    out = []
    for name, own in settings.candidates.items():
        overrides = [*settings.overrides, *own]
        try:
            raw = compose(overrides)
            cfg = validate(raw)
            check_config(cfg, launch_dir)
            if getattr(cfg.data, "hflip", False):
                raise ConfigError(
                    "data.hflip: ranking reads the training images once, unflipped; set data.hflip=false (runs of "
                    "the candidate with flips still count as its measurements)"
                )
        except ConfigError as e:
            raise ConfigError(f"candidates.{name}: {e}") from None
        out.append(Candidate(name, overrides, raw, cfg))
    tasks = {c.cfg.task.name for c in out}
    if len(tasks) > 1:
        raise ConfigError(f"candidates: all must predict the same task; got {', '.join(sorted(tasks))}")
    return out


def chosen_scores(settings: RankSettings, pool: list[Candidate]) -> list[str]:
    """The scores to compute: the named ones (each must apply to the task, and a score that reads a source
    classifier to every candidate), else every registered score that applies to the task."""
    task = pool[0].cfg.task.name
    if settings.scores is None:
        return [s for s in SCORES.names() if task in score_schema(s).tasks]
    for score in settings.scores:
        schema = score_schema(score)
        if task not in schema.tasks:
            raise ConfigError(f"scores: {score} applies to {' / '.join(schema.tasks)} tasks; this task is {task}")
        if schema.needs_source:
            headless = [c.name for c in pool if not getattr(c.cfg.backbone, "has_source_head", False)]
            if headless:
                raise ConfigError(
                    f"scores: {score} reads the backbone's source classifier head, which candidate(s) "
                    f"{', '.join(headless)} have not (only a full-depth small_cnn or EfficientNet-Lite has one); "
                    f"drop {score} or those candidates"
                )
    return list(settings.scores)


def main(argv: list[str] | None = None) -> int:
    settings_help = "\n".join(f"  {f.name:<11} {f.metadata['help']}" for f in fields(RankSettings))
    parser = argparse.ArgumentParser(
        prog="python -m src.rank",
        description="Rank candidate backbones by transferability scores of their cached frozen features.",
        epilog=f"options (key=value; see conf/rank/*.yaml for presets):\n{settings_help}\n"
        "example: python -m src.rank preset=digits_sources",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("options", nargs="*", help="key=value options")
    args = parser.parse_args(argv)
    launch_dir = Path.cwd()
    try:
        settings = parse(args.options)
        pool = candidates(settings, launch_dir)
        scores = chosen_scores(settings, pool)
    except ConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    from src.rank.run import rank  # torch, MLflow: only once the input is known to be good

    try:
        rank(settings, pool, scores, launch_dir)
    except ConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    return 0
