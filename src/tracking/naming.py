"""Run names a person can read in the MLflow runs table, where they are cut after ~18 characters: what varies
comes first (`lp_ft·lr=2e-4·s0`, a trial `t07·lr=3.1e-4·wd=0.01`), the constant context (data, backbone) after it
and in tags."""

from __future__ import annotations

import uuid
from collections.abc import Iterable

SEP = "·"
SHORT_KEYS = {
    "weight_decay": "wd",
    "head_dropout": "drop",
    "label_smoothing": "ls",
    "layer_decay": "ld",
    "max_epochs": "ep",
    "max_train_samples": "n",
    "labels_per_class": "n/class",
    "batch_size": "bs",
}
GROUPS = ("finetune", "backbone", "data", "optim", "regularization", "trainer", "experiment", "adapt")
# Overrides that say how a job runs, not what it is: never part of a name.
PLUMBING = ("sweep", "tracking", "hydra", "trainer.enable_progress_bar", "ckpt_path", "resume")


def short_value(value: str) -> str:
    """`0.00031` -> `3.1e-4`, `0.01` -> `0.01`; anything else unchanged."""
    try:
        number = float(value)
    except ValueError:
        return value.strip("'\"")
    if number.is_integer() and "e" not in value.lower() and "." not in value:
        return value
    if number != 0 and (abs(number) < 1e-3 or abs(number) >= 1e4):
        mantissa, exponent = f"{number:.1e}".split("e")
        return f"{mantissa.removesuffix('.0')}e{int(exponent)}"
    return f"{number:.3g}"


def part(key: str, value: str) -> str:
    """One name part: a config group's option alone (`lp_ft`), the seed as `s0`, else `key=value` (short key)."""
    key = key.lstrip("+")
    if key in GROUPS:
        return value
    if key == "seed":
        return f"s{value}"
    leaf = key.rsplit(".", 1)[-1]
    if value.startswith("{"):  # a mapping, e.g. an evaluation set's spec: its key names it
        return leaf
    if "/" in value:  # a path: its file name says enough
        value = value.rstrip("/").rsplit("/", 1)[-1]
    return f"{SHORT_KEYS.get(leaf, leaf)}={short_value(value)}"


def is_plumbing(key: str) -> bool:
    key = key.lstrip("+")
    return any(key == p or key.startswith(p + ".") for p in PLUMBING)


def from_overrides(overrides: Iterable[str], keys: Iterable[str] | None = None) -> list[str]:
    """Name parts of `key=value` overrides (only `keys`, if given), group choices first and the seed last."""
    pairs = [o.split("=", 1) for o in overrides if "=" in o]
    wanted = None if keys is None else {k.lstrip("+") for k in keys}
    pairs = [(k, v) for k, v in pairs if not is_plumbing(k) and (wanted is None or k.lstrip("+") in wanted)]
    order = {g: i for i, g in enumerate(GROUPS)}
    pairs.sort(key=lambda kv: (kv[0] == "seed", order.get(kv[0].lstrip("+"), len(order))))
    return [part(k, v) for k, v in pairs]


def unique_suffix() -> str:
    """uuid4 draws from os.urandom, so seeding the RNGs cannot repeat it."""
    return uuid.uuid4().hex[:4]
