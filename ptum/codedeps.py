"""The ptum source files a module can import: its import closure within the package.

One definition of "which code a result depends on", used by the fine-tuning cell cache (its key
is `source_digest` of these files, so a code change never reuses an old cell) and by the test that
checks each dvc.yaml stage lists exactly the code it runs. Imports are read from the source with
`ast` (top-level and inside functions, so lazy imports count); nothing is executed.

A package's __init__.py counts only when something is imported from the package itself
(`from ptum.models import build`): `from ptum.finetune import stats` imports the module
ptum/finetune/stats.py, not ptum/finetune/__init__.py.
"""

from __future__ import annotations

import ast
import hashlib
import sys
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
    """The sorted import closure of the named ptum modules (e.g. "ptum.finetune.cell")."""
    files = [module_file(m) for m in modules]
    missing = [m for m, f in zip(modules, files, strict=True) if f is None]
    if missing:
        raise ValueError(f"not ptum modules: {missing}")
    return sorted(closure(f for f in files if f is not None))


# ---------------------------------------------------------------- what the code does


class _Normalize(ast.NodeTransformer):
    """Drop what cannot change what code computes: docstrings, type annotations of functions
    and their local variables, `if TYPE_CHECKING:` blocks and `typing.cast(T, x)` (-> x).
    Comments and formatting are not in the tree. Annotations in class and module bodies stay
    (a dataclass's fields are its annotations)."""

    def __init__(self) -> None:
        self.in_function = False
        self.cast_names = {"typing.cast"}

    def _body(self, body: list[ast.stmt]) -> list[ast.stmt]:
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            if isinstance(body[0].value.value, str):
                body = body[1:]
        return body or [ast.Pass()]

    def _visit_body(self, node: ast.AST, in_function: bool) -> ast.AST:
        outer, self.in_function = self.in_function, in_function
        self.generic_visit(node)
        self.in_function = outer
        node.body = self._body(node.body)  # type: ignore[attr-defined]
        return node

    def visit_Module(self, node: ast.Module) -> ast.AST:
        return self._visit_body(node, False)

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.AST:
        return self._visit_body(node, False)

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> ast.AST:
        node.returns = None
        a = node.args
        for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]:
            if arg is not None:
                arg.annotation = None
        return self._visit_body(node, True)

    visit_FunctionDef = _function
    visit_AsyncFunctionDef = _function

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST | None:
        if not self.in_function:
            return self.generic_visit(node)
        if node.value is None:
            return None  # `x: int` in a function body declares, it does not run
        return self.visit(ast.Assign(targets=[node.target], value=node.value))

    def visit_If(self, node: ast.If) -> ast.AST | list[ast.stmt] | None:
        if _dotted(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            return [self.visit(s) for s in node.orelse] or None
        return self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> ast.AST | None:
        if node.module != "typing":
            return node
        kept = []
        for alias in node.names:
            if alias.name == "cast":
                self.cast_names.add(alias.asname or "cast")
            elif alias.name != "TYPE_CHECKING":
                kept.append(alias)
        if not kept:
            return None
        node.names = kept
        return node

    def visit_Call(self, node: ast.Call) -> ast.AST:
        if _dotted(node.func) in self.cast_names and len(node.args) == 2 and not node.keywords:
            return self.visit(node.args[1])
        return self.generic_visit(node)


def _dotted(node: ast.AST) -> str:
    """`a.b.c` -> "a.b.c"; "" for anything but names and attributes."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return f"{head}.{node.attr}" if head else ""
    return ""


def normalized_source(path: Path) -> str:
    """The syntax tree of `path` as `source_digest` hashes it (see _Normalize)."""
    tree = _Normalize().visit(ast.parse(path.read_text(encoding="utf-8")))
    return ast.dump(ast.fix_missing_locations(tree), include_attributes=False)


def source_digest(paths: Iterable[Path]) -> str:
    """SHA-256 of what the ptum files in `paths` do, not of how they read: equal for sources
    that differ only in comments, formatting, docstrings or type annotations (see _Normalize),
    different for any other change. The tree's form is Python's, so the Python minor version
    is part of the digest."""
    h = hashlib.sha256(f"ptum-source-1 python-{sys.version_info[0]}.{sys.version_info[1]}".encode())
    for p in sorted(paths):
        h.update(b"\0" + p.resolve().relative_to(ROOT).as_posix().encode() + b"\0")
        h.update(normalized_source(p).encode())
    return h.hexdigest()
