"""The ptum source files a module can import: its import closure within the package.

One definition of "which code a result depends on", used by the fine-tuning cell cache (its key
hashes these files, so a code change never reuses an old cell) and by the test that checks each
dvc.yaml stage lists exactly the code it runs. Imports are read from the source with `ast`
(top-level and inside functions, so lazy imports count); nothing is executed.

A package's __init__.py counts only when something is imported from the package itself
(`from ptum.models import build`): `from ptum.finetune import stats` imports the module
ptum/finetune/stats.py, not ptum/finetune/__init__.py.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the directory holding ptum/


def module_file(name: str) -> Path | None:
    """ptum.a.b -> ptum/a/b.py or ptum/a/b/__init__.py; None outside ptum."""
    if name != "ptum" and not name.startswith("ptum."):
        return None
    base = ROOT / Path(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def imported_files(nodes: Iterable[ast.AST]) -> set[Path]:
    """ptum files imported anywhere within `nodes` (absolute imports)."""
    found: set[Path] = set()
    for node in (n for top in nodes for n in ast.walk(top)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from ptum.finetune import stats` imports the module ptum.finetune.stats;
            # `from ptum.models import build` a name defined in ptum/models/__init__.py.
            names = [
                f"{node.module}.{a.name}"
                if module_file(f"{node.module}.{a.name}") is not None
                else node.module
                for a in node.names
            ]
        else:
            continue
        found.update(p for p in map(module_file, names) if p is not None)
    return found


def closure(start: Iterable[Path]) -> set[Path]:
    """`start` and every ptum file it imports, transitively."""
    seen: set[Path] = set()
    todo = list(start)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += imported_files([ast.parse(path.read_text(encoding="utf-8"))])
    return seen


def module_closure(*modules: str) -> list[Path]:
    """The sorted import closure of the named ptum modules (e.g. "ptum.finetune.train")."""
    files = [module_file(m) for m in modules]
    missing = [m for m, f in zip(modules, files, strict=True) if f is None]
    if missing:
        raise ValueError(f"not ptum modules: {missing}")
    return sorted(closure(f for f in files if f is not None))
