"""The import graph of ptum/: no cycle, and no import from a lower layer to a higher one.

Layers, lowest first (a module may import its own layer and the ones below it):
    config, io, paths, hashing, locks, codedeps, presets, progress  ->  models, heads
    ->  data, tokenize  ->  checkpoint  ->  pretrain  ->  finetune, tune, serving, report(_format)  ->  stages  ->  cli
Every import counts, also one inside a function or under `if TYPE_CHECKING`: a type-only
import is still a dependency a reader follows.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "ptum"
LAYERS: list[tuple[str, ...]] = [
    ("__init__", "config", "io", "paths", "hashing", "locks", "codedeps", "presets", "progress"),
    ("models", "heads"),
    ("data", "tokenize"),
    ("checkpoint",),
    ("pretrain",),
    ("finetune", "tune", "serving", "report", "report_format"),
    ("stages",),
    ("cli", "__main__"),
]
LAYER = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def _module_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports(path: Path) -> set[Path]:
    """The ptum files `path` imports (a `from package import submodule` names the submodule)."""
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = [f"{node.module}.{a.name}" for a in node.names]
            names = [s if _module_file(s) else node.module for s in subs]
        else:
            continue
        for name in names:
            if name == "ptum" or name.startswith("ptum."):
                target = _module_file(name)
                if target is not None and target != path:
                    found.add(target)
    return found


def graph() -> dict[Path, set[Path]]:
    return {p: imports(p) for p in sorted(PKG.rglob("*.py"))}


def layer(path: Path) -> int:
    part = path.relative_to(PKG).parts[0].removesuffix(".py")
    return LAYER[part]


def test_every_module_has_a_layer():
    unknown = (
        {p.relative_to(PKG).parts[0] for p in PKG.rglob("*.py")}
        - {f"{k}.py" for k in LAYER}
        - set(LAYER)
    )
    assert not unknown, f"give these a layer in tests/test_layers.py: {sorted(unknown)}"


def test_no_import_runs_from_a_lower_layer_to_a_higher_one():
    upward = [
        f"{a.relative_to(ROOT)} -> {b.relative_to(ROOT)}"
        for a, targets in graph().items()
        for b in targets
        if layer(b) > layer(a)
    ]
    assert not upward, upward


def _cycle(edges: dict, nodes: list) -> list | None:
    """One cycle of the directed graph `edges` (node -> set of nodes), or None."""
    state: dict = {}
    stack: list = []

    def visit(n) -> list | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ()), key=str):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in nodes:
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_cycle_between_files():
    g = graph()
    cycle = _cycle(g, list(g))
    assert cycle is None, [str(p.relative_to(ROOT)) for p in cycle]


def _package(path: Path) -> str:
    rel = path.relative_to(PKG)
    return str(rel.parent) if len(rel.parts) > 1 else rel.stem


def test_no_import_cycle_between_packages():
    edges: dict[str, set[str]] = {}
    for a, targets in graph().items():
        for b in targets:
            if _package(a) != _package(b) and not _package(a).startswith(_package(b) + "/"):
                edges.setdefault(_package(a), set()).add(_package(b))
    cycle = _cycle(edges, sorted(edges))
    assert cycle is None, cycle


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from ptum.models import id_vocab as ids\n", {"ptum/models/id_vocab.py"}),
        ("import ptum.data.corpus\n", {"ptum/data/corpus.py"}),
        ("def f():\n    from ptum.paths import RAW\n", {"ptum/paths.py"}),
    ],
)
def test_imports_are_read_wherever_they_stand(tmp_path, source, expected):
    f = tmp_path / "m.py"
    f.write_text(source)
    assert {str(p.relative_to(ROOT)) for p in imports(f)} == expected


# Only the stage layer (and the CLI that calls it) reads config sections; the library takes
# explicit arguments or its own options dataclasses, which ptum/stages/ builds.
CONFIG_READERS = ("config", "stages", "cli.py")


def config_classes_imported(path: Path) -> list[str]:
    """The `*Config` / `Params` classes that `path` imports from ptum.config."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ptum.config"):
            found += [
                f"{node.module}.{a.name}"
                for a in node.names
                if a.name.endswith("Config") or a.name in ("Params", "ModelParams", "*")
            ]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("ptum.config")]
    return found


def test_only_the_stages_read_config_sections():
    readers = [
        f"{p.relative_to(ROOT)}: {', '.join(names)}"
        for p in sorted(PKG.rglob("*.py"))
        if p.relative_to(PKG).parts[0] not in CONFIG_READERS
        and (names := config_classes_imported(p))
    ]
    assert not readers, readers


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from ptum.config import FinetuneConfig, to_dict\n", ["ptum.config.FinetuneConfig"]),
        ("def f():\n    from ptum.config.schema import Params\n", ["ptum.config.schema.Params"]),
        ("import ptum.config\n", ["ptum.config"]),
        ("from ptum.config.load import to_dict\n", []),
    ],
)
def test_config_imports_are_found_wherever_they_stand(tmp_path, source, expected):
    f = tmp_path / "m.py"
    f.write_text(source)
    assert config_classes_imported(f) == expected
