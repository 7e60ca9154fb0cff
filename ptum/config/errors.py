"""ConfigError and the range check every config section uses."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A params file or override that does not match the expected schema."""


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ConfigError naming the key, its value and the allowed range unless `ok`."""
    if not ok:
        raise ConfigError(f"{key} = {value!r} is out of range: must be {allowed}")
