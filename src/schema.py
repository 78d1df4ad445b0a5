"""Helpers the config schemas use for range/choice checks (kept import-light: every schema module uses them)."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A composed config that must not run; the message names the offending key."""


def check(condition: bool, message: str) -> None:
    """Range/choice check used in ``__post_init__`` of the schemas; the group prefix is added later."""
    if not condition:
        raise ValueError(message)


def check_choice(value: Any, key: str, choices: tuple[str, ...]) -> None:
    check(value in choices, f"{key}: must be one of {', '.join(choices)}; got {value!r}")
