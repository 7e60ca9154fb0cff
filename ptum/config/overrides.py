"""`--set section.key=value` overrides (values in YAML syntax) applied to raw params."""

from __future__ import annotations

from typing import Any

import yaml

from ptum.config.errors import ConfigError


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `section.key=value` (value in YAML syntax) into (["section", "key"], value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, _, value = text.partition("=")
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override {text!r}: expected section.key=value")
    return parts, yaml.safe_load(value) if value.strip() else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str], sections: set[str]) -> None:
    """Set each `section.key=value` of `overrides` in the raw params mapping, in place."""
    for text in overrides:
        parts, value = parse_override(text)
        if parts[0] not in sections:
            raise ConfigError(
                f"override {text!r}: unknown section {parts[0]!r}; known: {sorted(sections)}"
            )
        node = raw.setdefault(parts[0], {}) or {}
        raw[parts[0]] = node
        for i, p in enumerate(parts[1:-1], start=1):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(
                    f"override {text!r}: {'.'.join(parts[: i + 1])} is a value ({node!r}), "
                    "not a section with keys; set it directly"
                )
        node[parts[-1]] = value
