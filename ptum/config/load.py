"""Loading params.yaml: strict type checks of every key, overrides, the cross-section checks."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from ptum.config.errors import ConfigError
from ptum.config.overrides import apply_overrides
from ptum.config.schema import SECTIONS, Params

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check `value` against a type hint, converting lists to tuples; raise ConfigError."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {list(allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            if option is type(None) and value is None:
                return None
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} does not match {hint}")
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads "1e-3" as a string; accept it as a number
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    raise ConfigError(f"{where}: unsupported type {hint}")  # pragma: no cover - schema bug


def build(cls: type, raw: Any, where: str) -> Any:
    """Build frozen dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in raw.items()}
    return cls(**kwargs)


class _DuplicateKey(yaml.YAMLError):
    """A key that appears twice in one mapping; its text is "LINE: key ... (also line N)..."."""


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key appearing twice in one mapping (PyYAML keeps the
    last silently, so a repeated section would drop every key of the first)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.where: dict[int, str] = {}  # id(mapping node) -> dotted path of its section

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        section = self.where.get(id(node), "")
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue  # a merge key ("<<") overrides on purpose; others fail in super()
            key, line = self.construct_object(key_node), key_node.start_mark.line + 1
            if key in seen and not section:
                raise _DuplicateKey(
                    f"{line}: section {key!r} appears twice (also line {seen[key]}): keep one, "
                    "with the keys of both"
                )
            if key in seen:
                raise _DuplicateKey(
                    f"{line}: key {key!r} appears twice in section {section} (also line "
                    f"{seen[key]}): keep one"
                )
            seen[key] = line
            self._name(value_node, f"{section}.{key}" if section else str(key))
        return super().construct_mapping(node, deep=deep)

    def _name(self, node: yaml.Node, where: str) -> None:
        """Record the section path of each mapping in `node` (lists of mappings: path[i])."""
        if isinstance(node, yaml.MappingNode):
            self.where[id(node)] = where
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._name(item, f"{where}[{i}]")


def read_params_file(path: Path) -> dict[str, Any]:
    """The raw sections of a params file: UTF-8 YAML, a mapping at top level, no repeated key."""
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory; name the params file itself") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the params file: {e.strerror}") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "save it as UTF-8"
        ) from None
    try:
        loaded = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except _DuplicateKey as e:
        raise ConfigError(f"{path}:{e}") from None
    except yaml.YAMLError as e:  # its text names the line and column
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from e
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at top level")
    return dict(loaded or {})


def load_params(
    path: str | Path = "params.yaml",
    overrides: list[str] | None = None,
    *,
    required: bool = False,
) -> Params:
    """Load params.yaml, apply overrides, validate every section.

    A missing file is an error when `required` (a path the user named); otherwise the built-in
    defaults (the root params.yaml's values) are used, with one line on stderr saying so.
    Unknown sections are rejected like unknown keys: a misspelt section must not silently fall
    back to defaults.
    """
    path = Path(path)
    raw: dict[str, Any] = {}
    if path.exists():
        raw = read_params_file(path)
    elif required:
        raise ConfigError(
            f"{path}: no such params file; check the path given to --params, or leave --params "
            "out to use ./params.yaml"
        )
    else:
        print(
            f"ptum: no {path.name} in {os.path.abspath(path.parent)}: using the built-in "
            "defaults (run ptum from the project root)",
            file=sys.stderr,
        )
    apply_overrides(raw, list(overrides or []), set(SECTIONS))
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path.name}: unknown section(s) {unknown}; known: {sorted(SECTIONS)}")
    sections = {
        name: build(cls, raw.get(name), f"{path.name}:{name}") for name, cls in SECTIONS.items()
    }
    return Params(**sections)


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain JSON-able dict (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    return obj
