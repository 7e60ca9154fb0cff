"""The import closure that keys the fine-tuning cache and checks dvc.yaml's code deps."""

from __future__ import annotations

import pytest

from ptum.codedeps import ROOT, module_closure, source_digest
from ptum.finetune import grid


def _rel(paths):
    return {p.relative_to(ROOT).as_posix() for p in paths}


def test_closure_follows_imports_transitively_and_stops_at_the_package():
    files = _rel(module_closure("ptum.finetune.demo"))
    # demo -> data.corpus -> data.verified -> hashing (transitive), demo -> models.layers
    assert {"ptum/finetune/demo.py", "ptum/data/verified.py", "ptum/hashing.py"} <= files
    assert "ptum/models/layers.py" in files
    # fine-tuning runs no pre-training code
    assert not any(f.startswith(("ptum/tune", "ptum/serving", "ptum/pretrain")) for f in files)
    assert all((ROOT / f).is_file() for f in files)


def test_unknown_module_is_refused():
    with pytest.raises(ValueError, match="not ptum modules"):
        module_closure("numpy")


def test_cell_cache_key_covers_every_module_a_cell_runs(monkeypatch):
    seen = {}

    def fake_digest(files):
        seen["files"] = _rel(files)
        return "x"

    monkeypatch.setattr(grid, "source_digest", fake_digest)
    grid._code_digest()
    # The split functions each repeat re-draws with, the baselines, the heads and the models.
    assert {
        "ptum/data/prepare/splits.py",
        "ptum/finetune/baselines.py",
        "ptum/heads.py",
        "ptum/models/user.py",
        "ptum/finetune/metrics.py",
    } <= seen["files"]


_BASE = """\
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Opts:
    lr: float = 1e-3


def step(x, n=2):
    y = x * n
    return y + Opts().lr
"""

# Sources that compute exactly what _BASE computes.
_SAME = {
    "comments and formatting": _BASE.replace("y = x * n", "y = (x\n         * n)  # scaled"),
    "docstrings": '"""Module doc."""\n'
    + _BASE.replace("def step(x, n=2):\n", 'def step(x, n=2):\n    """Doc."""\n').replace(
        "    lr: float", '    """Options."""\n\n    lr: float'
    ),
    "annotations": _BASE.replace(
        "def step(x, n=2):", "def step(x: Tensor, n: int = 2) -> Tensor:"
    ).replace("    y = x * n", "    z: int\n    y: Tensor = x * n"),
    "type-only imports and casts": _BASE.replace(
        "import dataclasses\n",
        "import dataclasses\nfrom typing import TYPE_CHECKING, cast\n\n"
        "if TYPE_CHECKING:\n    from torch import Tensor\n",
    ).replace("return y + ", "return cast(Tensor, y) + "),
}

# Sources that compute something else.
_OTHER = {
    "a constant": _BASE.replace("1e-3", "1e-4"),
    "a default argument": _BASE.replace("n=2", "n=3"),
    "an operator": _BASE.replace("x * n", "x + n"),
    "a dataclass field's annotation": _BASE.replace("lr: float = 1e-3", "lr: ClassVar = 1e-3"),
    "a statement": _BASE.replace("    return", "    print(y)\n    return"),
}


def _digest(monkeypatch, root, text):
    """source_digest of `text` as ptum/m.py of a checkout at `root`."""
    path = root / "ptum" / "m.py"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    monkeypatch.setattr("ptum.codedeps.ROOT", root)
    return source_digest([path])


@pytest.mark.parametrize("change", sorted(_SAME))
def test_source_digest_ignores_what_cannot_change_a_result(tmp_path, monkeypatch, change):
    base = _digest(monkeypatch, tmp_path / "a", _BASE)
    assert base == _digest(monkeypatch, tmp_path / "b", _SAME[change])


@pytest.mark.parametrize("change", sorted(_OTHER))
def test_source_digest_sees_every_change_to_what_code_does(tmp_path, monkeypatch, change):
    base = _digest(monkeypatch, tmp_path / "a", _BASE)
    assert base != _digest(monkeypatch, tmp_path / "b", _OTHER[change])


def test_source_digest_names_each_file(tmp_path, monkeypatch):
    """Moving code to another module is a change (another file may import it)."""
    a = tmp_path / "ptum" / "a.py"
    b = tmp_path / "ptum" / "b.py"
    a.parent.mkdir()
    a.write_text(_BASE)
    b.write_text(_BASE)
    monkeypatch.setattr("ptum.codedeps.ROOT", tmp_path)
    assert source_digest([a]) != source_digest([b])
