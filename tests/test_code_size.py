"""No function in ptum/ over 60 lines, no module over 400: a longer one hides several jobs.

A function's length runs from its `def` line to its last line (decorators not counted,
docstring and comments counted), as `ast` gives it: end_lineno - lineno + 1. Methods and
nested functions count on their own; a class is not a function. A module's length is its
number of lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "ptum"
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 400


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int, int]]:
    """(qualified name, first line, length) of every function or method of `source` longer
    than `limit` lines."""
    found: list[tuple[str, int, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                length = (child.end_lineno or child.lineno) - child.lineno + 1
                if length > limit:
                    found.append((name, child.lineno, length))
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return found


def _modules() -> list[Path]:
    return sorted(PKG.rglob("*.py"))


def test_no_function_is_over_60_lines():
    offenders = [
        f"{path.relative_to(ROOT)}:{line} {name}: {length} lines"
        for path in _modules()
        for name, line, length in long_functions(path.read_text(encoding="utf-8"))
    ]
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines: {offenders}"


def test_no_module_is_over_400_lines():
    offenders = [
        f"{path.relative_to(ROOT)}: {n} lines"
        for path in _modules()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    ]
    assert not offenders, f"modules over {MAX_MODULE_LINES} lines: {offenders}"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("def f():\n" + "    x = 1\n" * 60, [("f", 1, 61)]),
        ("def f():\n" + "    x = 1\n" * 59, []),
        ("@decorator\ndef f():\n" + "    x = 1\n" * 59, []),  # decorators are not counted
        ("class A:\n    def m(self):\n" + "        x = 1\n" * 60, [("A.m", 2, 61)]),
        (
            "def outer():\n    def inner():\n" + "        x = 1\n" * 60,
            [("outer", 1, 62), ("outer.inner", 2, 61)],
        ),
        ("if True:\n    async def g():\n" + "        x = 1\n" * 60, [("g", 2, 61)]),
    ],
)
def test_long_functions_are_found_wherever_they_stand(source, expected):
    assert long_functions(source) == expected
