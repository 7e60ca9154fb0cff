"""The import closure that keys the fine-tuning cache and checks dvc.yaml's code deps."""

from __future__ import annotations

import pytest

from ptum.codedeps import ROOT, module_closure
from ptum.finetune import grid


def _rel(paths):
    return {p.relative_to(ROOT).as_posix() for p in paths}


def test_closure_follows_imports_transitively_and_stops_at_the_package():
    files = _rel(module_closure("ptum.finetune.train"))
    # train -> pretrain.tasks -> models.user_model -> models.layers (transitive)
    assert {"ptum/finetune/train.py", "ptum/pretrain/tasks.py", "ptum/models/layers.py"} <= files
    assert not any(f.startswith("ptum/tune") or f.startswith("ptum/serving") for f in files)
    assert all((ROOT / f).is_file() for f in files)


def test_unknown_module_is_refused():
    with pytest.raises(ValueError, match="not ptum modules"):
        module_closure("numpy")


def test_cell_cache_key_covers_every_module_a_cell_runs(monkeypatch):
    seen = {}

    def fake_digest(files):
        seen["files"] = _rel(files)
        return "x"

    monkeypatch.setattr(grid, "file_digest", fake_digest)
    grid._code_digest()
    # The split functions each repeat re-draws with, the baselines, the heads and the models.
    assert {
        "ptum/data/prepare/splits.py",
        "ptum/finetune/baselines.py",
        "ptum/heads.py",
        "ptum/models/user.py",
        "ptum/finetune/metrics.py",
    } <= seen["files"]
