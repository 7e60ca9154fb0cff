"""ConfigError and the checks every config section uses."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

# Every `seed` key: numpy's legacy seeding and SentencePiece take seeds below 2**32, and 2**31
# leaves room for the offsets the stages add (seed + repeat, seed + trial, ...).
SEED_LIMIT = 2**31


class ConfigError(ValueError):
    """A params file or override that does not match the expected schema."""


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ConfigError naming the key, its value and the allowed range unless `ok`."""
    if not ok:
        raise ConfigError(f"{key} = {value!r} is out of range: must be {allowed}")


def require_seed(value: int, key: str) -> None:
    """Raise ConfigError naming the key unless `value` is a seed every stage can take."""
    require(0 <= value < SEED_LIMIT, key, value, f"an integer in [0, {SEED_LIMIT})")


def require_one_of(value: Any, allowed: Collection[Any], key: str) -> None:
    """Raise ConfigError naming the key and the allowed values unless `value` is one of them."""
    require(value in allowed, key, value, f"one of {' | '.join(map(str, allowed))}")


def require_each(values: tuple, allowed: Collection[Any], key: str) -> None:
    """Raise ConfigError unless `values` is a non-empty list of distinct allowed values."""
    require(
        len(values) >= 1 and set(values) <= set(allowed) and len(set(values)) == len(values),
        key,
        values,
        f"a non-empty list of distinct values from {' | '.join(map(str, allowed))}",
    )
