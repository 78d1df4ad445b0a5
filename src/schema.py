"""Helpers the config schemas use for range/choice checks (kept import-light: every schema module uses them)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class ConfigError(ValueError):
    """A composed config that must not run; the message names the offending key."""


def check(condition: bool, message: str) -> None:
    """Range/choice check used in ``__post_init__`` of the schemas; the group prefix is added later."""
    if not condition:
        raise ValueError(message)


def check_choice(value: Any, key: str, choices: tuple[str, ...]) -> None:
    check(value in choices, f"{key}: must be one of {', '.join(choices)}; got {value!r}")


@contextmanager
def blame(key: str) -> Iterator[None]:
    """Re-raise the errors bad user input causes as a `ConfigError` naming `key`, so a missing model, an unreadable
    file or a bad LoRA target reads as one line about the setting to change."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, OSError, KeyError, ImportError, UnicodeError) as e:
        raise ConfigError(f"{key}: {str(e).strip() or type(e).__name__}") from e
