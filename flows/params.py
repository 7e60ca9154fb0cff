"""Flow parameters -> the `section.key=value` overrides of the experiment, and the effective
params they give (params.yaml + overrides), checked with ptum's schema before anything runs."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from ptum.config import load_params, parse_override
from ptum.presets import QUICK


def parse_overrides(texts: Iterable[str]) -> dict[str, Any]:
    """`section.key=value` strings (value in YAML, as for `ptum --set`) -> {"section.key": value}."""
    out: dict[str, Any] = {}
    for text in texts:
        parts, value = parse_override(text)
        out[".".join(parts)] = value
    return out


def overrides_for(
    *,
    source: str | None,
    data_path: str | None,
    size: str | None,
    quick: bool,
    extra: Iterable[str] = (),
) -> dict[str, Any]:
    """Flow parameters -> {"section.key": value} overrides; None keeps params.yaml's value.

    Later ones win: the QUICK preset, then source/data_path/size, then the `extra` strings.
    """
    out = parse_overrides(QUICK) if quick else {}
    if quick and size is not None and size != out.get("data.size", size):
        raise ValueError(f"quick=True means data.size={out['data.size']}; got size={size!r}")
    for key, value in (("data.source", source), ("data.path", data_path), ("data.size", size)):
        if value is not None:
            out[key] = value
    out.update(parse_overrides(extra))
    return out


def hydra_value(value: Any) -> str:
    """A value in the override grammar of `dvc exp run -S` (Hydra's): strings always quoted, so
    that "", "1e-4" or "a: b" stay strings; lists and dicts written out element by element."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def set_args(overrides: Mapping[str, Any]) -> list[str]:
    """{"section.key": value} -> ["-S", "section.key=value", ...] for `dvc exp run`."""
    return [a for k, v in overrides.items() for a in ("-S", f"{k}={hydra_value(v)}")]


def effective_params(params_file: Path, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """params.yaml with the overrides applied (what the experiment's params.yaml will hold).

    Validated with ptum's schema first: an unknown key or a wrong type fails here, before DVC
    runs anything.
    """
    load_params(params_file, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    spec = yaml.safe_load(params_file.read_text(encoding="utf-8")) or {}
    for key, value in overrides.items():
        *sections, leaf = key.split(".")
        node = spec
        for name in sections:
            node = node.setdefault(name, {})
        node[leaf] = value
    return spec
