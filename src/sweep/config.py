"""The `sweep` node (one `sweeps/NAME.yaml`) parsed, and the Optuna objects it names (schema: schema.py).

Sampler and pruner are picked by name, so `sweep.pruner=none` switches from the command line; `kwargs` holds
each one's keyword arguments (any the Optuna class accepts). The search space maps config keys (the job's
override keys) to distributions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from src.sweep.schema import PRUNERS, SAMPLERS, SweepConfig, SweepError


def load(node: DictConfig | Mapping[str, Any]) -> SweepConfig:
    """Parse a composed `sweep` node (unknown keys and bad types are errors naming the key)."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SweepConfig), node))
    except Exception as e:  # ours name the key already; OmegaConf's carry it: keep their first line
        message = str(e).splitlines()[0]
        raise SweepError(message if message.startswith("sweep.") else f"sweep: {message}") from None


def distribution(key: str, spec: Any) -> BaseDistribution:
    """`[a, b]` or `{choices: [...]}` -> categorical; `{type: float|int, low, high, log?, step?}` -> numeric."""
    if isinstance(spec, list | tuple):
        spec = {"choices": spec}
    spec = {k: v for k, v in spec.items() if k != "when"}
    try:
        if "choices" in spec:
            return CategoricalDistribution(list(spec.pop("choices")), **spec)
        kind = spec.pop("type", None)
        if kind == "float":
            return FloatDistribution(**spec)
        if kind == "int":
            return IntDistribution(**spec)
    except (TypeError, ValueError) as e:
        raise SweepError(f"sweep.params.{key}: {e}") from None
    raise SweepError(f"sweep.params.{key}: give choices (a list) or type: float|int with low and high; got {spec}")


def search_space(params: Mapping[str, Any]) -> dict[str, BaseDistribution]:
    return {key: distribution(key, spec) for key, spec in params.items()}


FOLD_KEY = "cv.fold"  # a replicate, never a hyperparameter (see check_fold_dimension)


def check_fold_dimension(space: Mapping[str, BaseDistribution], settings: SweepConfig) -> None:
    """`cv.fold` searched like a hyperparameter is refused: a sampler would steer trials towards the easiest fold
    and a pruner would stop trials for drawing a hard one, so the study's best would be a fold's luck. Only an
    exhaustive grid without pruning runs every fold of every configuration alike, for src.compare to average."""
    if FOLD_KEY in space and (settings.sampler != "grid" or settings.pruner != "none"):
        raise SweepError(
            f"{FOLD_KEY}: a fold is not a hyperparameter (the {settings.sampler} sampler and {settings.pruner} pruner "
            "would favour easy folds); fix one fold (cv.fold=0), or run every fold of every configuration with "
            "sweep.sampler=grid sweep.pruner=none and average them with python -m src.compare sweep=<study>"
        )


def conditions(params: Mapping[str, Any]) -> dict[str, dict[str, list[Any]]]:
    """`when: {finetune: partial}` (or a list of values) samples a key only in trials where earlier keys took
    those values, so a strategy's own knobs (finetune.k, finetune.r) are searched only with that strategy."""
    out: dict[str, dict[str, list[Any]]] = {}
    for i, (key, spec) in enumerate(params.items()):
        when = spec.get("when") if isinstance(spec, Mapping) else None
        if not when:
            continue
        unknown = sorted(set(when) - set(list(params)[:i]))
        if unknown:
            raise SweepError(f"sweep.params.{key}.when: {unknown} must be searched keys listed before {key}")
        out[key] = {k: list(v) if isinstance(v, list | tuple) else [v] for k, v in when.items()}
    return out


def suggest(
    trial: optuna.Trial,
    space: Mapping[str, BaseDistribution],
    when: Mapping[str, Mapping[str, list[Any]]],
    fixed: Mapping[str, Any],
) -> None:
    """Sample the space into `trial` in order, skipping keys whose `when` is not met (by a sampled or fixed
    value); a conditional space is what TPE's `group: true` models."""
    for key, dist in space.items():
        values = {**fixed, **trial.params}
        if not all(values.get(k) in allowed for k, allowed in when.get(key, {}).items()):
            continue
        if isinstance(dist, CategoricalDistribution):
            trial.suggest_categorical(key, dist.choices)
        elif isinstance(dist, IntDistribution):
            trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
        else:
            trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)


def grid(space: Mapping[str, BaseDistribution]) -> dict[str, list[Any]]:
    """Every value of every dimension; floats need a step, since a grid cannot enumerate an interval."""
    out: dict[str, list[Any]] = {}
    for key, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            out[key] = list(dist.choices)
        elif isinstance(dist, IntDistribution) and not dist.log:
            out[key] = list(range(dist.low, dist.high + 1, dist.step))
        elif isinstance(dist, FloatDistribution) and dist.step is not None:
            n = int(math.floor((dist.high - dist.low) / dist.step + 1e-9)) + 1
            out[key] = [dist.low + i * dist.step for i in range(n)]
        else:
            raise SweepError(f"sweep.params.{key}: the grid sampler needs choices, linear ints or a float step")
    return out


def grid_size(space: Mapping[str, BaseDistribution]) -> int:
    return math.prod(len(values) for values in grid(space).values())


def sampler(settings: SweepConfig, space: Mapping[str, BaseDistribution], seed_offset: int) -> Any:
    """The sampler; its seed is shifted by the trials already in the study so a resumed sweep draws new points."""
    kwargs = dict(settings.kwargs.get(settings.sampler, {}))
    if settings.seed is not None:
        kwargs["seed"] = settings.seed + seed_offset
    if settings.sampler == "grid":
        kwargs["search_space"] = grid(space)
    return _instantiate(settings.sampler, getattr(optuna.samplers, SAMPLERS[settings.sampler]), kwargs)


def pruner(settings: SweepConfig) -> optuna.pruners.BasePruner:
    cls = getattr(optuna.pruners, PRUNERS[settings.pruner])
    return _instantiate(settings.pruner, cls, dict(settings.kwargs.get(settings.pruner, {})))


def _instantiate(name: str, cls: type, kwargs: dict[str, Any]) -> Any:
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, ImportError) as e:
        raise SweepError(f"sweep.kwargs.{name}: {cls.__name__}({', '.join(kwargs)}): {e}") from None


def describe(dist: BaseDistribution) -> str:
    """Short, readable form for MLflow params: `log-float[0.0001, 0.1]`, `int[3, 6] step 1`, `{a, b}`."""
    if isinstance(dist, CategoricalDistribution):
        return "{" + ", ".join(map(str, dist.choices)) + "}"
    kind = ("log-" if dist.log else "") + ("int" if isinstance(dist, IntDistribution) else "float")
    step = f" step {dist.step}" if dist.step not in (None, 1) else ""
    return f"{kind}[{dist.low}, {dist.high}]{step}"
