"""dvc.yaml's code deps are the import closure of each stage's entry point, no more, no less.

`ptum STAGE` runs ptum/cli.py's `_STAGE` function: the closure starts from cli.py's top-level
imports, the imports inside `_STAGE` and inside the cli.py helpers it calls, and follows every
import (top-level or inside a function) of every ptum module reached. A package's __init__.py
counts only when something is imported from the package itself (`from ptum.models import x`):
the other __init__ files hold a docstring only. A directory in deps stands for all its .py files
(so it may be listed only when the closure needs every one of them).

    python tests/test_dvc_deps.py     # prints each stage's code deps, as dvc.yaml should list them
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from ptum.codedeps import ROOT, closure, imported_files

PKG = ROOT / "ptum"


def stage_code(stage: str) -> set[str]:
    """The ptum files `ptum STAGE` can import, relative to the project root."""
    cli = PKG / "cli.py"
    tree = ast.parse(cli.read_text(encoding="utf-8"))
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    reached, todo = set(), [f"_{stage}"]
    while todo:  # the stage's function and the cli.py helpers it calls
        name = todo.pop()
        if name in reached:
            continue
        reached.add(name)
        for node in ast.walk(funcs[name]):
            if isinstance(node, ast.Name) and node.id in funcs:
                todo.append(node.id)
    files = closure(imported_files(top + [funcs[n] for n in reached])) | {cli}
    return {p.relative_to(ROOT).as_posix() for p in files}


def _stages() -> dict[str, dict]:
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))
    return {name: s.get("do", s) for name, s in spec["stages"].items()}


def listed_code(body: dict) -> set[str]:
    """The ptum files a stage's deps name; a directory stands for every .py file in it."""
    files: set[str] = set()
    for dep in body.get("deps") or []:
        dep = dep if isinstance(dep, str) else next(iter(dep))
        if not dep.startswith("ptum/"):
            continue
        path = ROOT / dep
        found = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        files.update(p.relative_to(ROOT).as_posix() for p in found)
    return files


@pytest.mark.parametrize("stage", list(_stages()))
def test_code_deps_are_the_import_closure_of_the_stage(stage):
    listed = listed_code(_stages()[stage])
    needed = stage_code(stage)
    assert not needed - listed, f"dvc.yaml {stage}: missing code deps {sorted(needed - listed)}"
    assert not listed - needed, f"dvc.yaml {stage}: extra code deps {sorted(listed - needed)}"


def test_the_closure_follows_imports_inside_functions():
    # The CLI imports each stage module inside a function; the fine-tuning code follows.
    code = stage_code("finetune")
    assert {"ptum/cli.py", "ptum/stages/finetune.py", "ptum/checkpoint/loading.py"} <= code
    assert not any(p.startswith("ptum/tune/") for p in code)
    assert "ptum/serving/export.py" in stage_code("export")


def needed_deps(stage: str) -> list[str]:
    """The shortest dep list for `stage`'s code: a directory whose every file is needed stands
    for them all."""
    code = stage_code(stage)
    dirs = sorted({str(Path(p).parent) for p in code} - {"ptum"})
    whole = [d for d in dirs if listed_code({"deps": [d]}) <= code]
    whole = [d for d in whole if not any(d.startswith(w + "/") for w in whole)]
    rest = [p for p in code if not any(p.startswith(w + "/") for w in whole)]
    return sorted(whole + rest)


def rewrite(text: str) -> str:
    """dvc.yaml `text` with each stage's ptum/ deps replaced by `needed_deps` (other deps,
    comments and order kept; the code deps stand where the first one stood)."""
    lines, out, stage, i = text.splitlines(keepends=True), [], None, 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("  ") and not line.startswith("   ") and line.rstrip().endswith(":"):
            stage = line.strip()[:-1]
        out.append(line)
        i += 1
        if line.strip() != "deps:" or stage not in _stages():
            continue
        block = []
        while i < len(lines) and lines[i].lstrip().startswith(("- ", "#")):
            block.append(lines[i])
            i += 1
        indent = next(b for b in block if b.lstrip().startswith("- ")).split("- ")[0]
        code = [b for b in block if b.lstrip().startswith("- ptum/")]
        at = block.index(code[0]) if code else len(block)
        kept = [b for b in block if b not in code]
        new = [f"{indent}- {d}\n" for d in needed_deps(stage)]
        out.extend(kept[:at] + new + kept[at:])
    return "".join(out)


if __name__ == "__main__":
    # python tests/test_dvc_deps.py          print each stage's code deps
    # python tests/test_dvc_deps.py --write  rewrite dvc.yaml's code deps to them
    import sys

    if "--write" in sys.argv:
        path = ROOT / "dvc.yaml"
        path.write_text(rewrite(path.read_text(encoding="utf-8")), encoding="utf-8")
    else:
        for name in _stages():
            print(f"{name}:")
            for dep in needed_deps(name):
                print(f"  - {dep}")
