"""Stage `regime` as DVC sees it: what it declares in dvc.yaml is there after any run."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from ptum import paths
from ptum.config import Params
from ptum.stages import regime

ROOT = Path(__file__).resolve().parents[2]


def git_tracked_outs(stage: str) -> list[Path]:
    """The outputs of `stage` in the root dvc.yaml that git stores (cache: false)."""
    outs = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["outs"]
    return [
        Path(p)
        for o in outs
        if isinstance(o, dict)
        for p, opt in o.items()
        if opt.get("cache") is False
    ]


def test_without_pools_every_git_tracked_output_holds_a_file(tiny_pipeline, tmp_path, monkeypatch):
    """Git stores no empty folder: a folder output that the stage can leave empty is missing
    from a fresh clone, and `dvc status` there calls the stage changed (the root default runs no
    pool). A figure left from an earlier run goes: the folder persists."""
    for name in ("prepared", "tokenized"):
        shutil.copytree(tiny_pipeline / name, tmp_path / "data" / name)
    monkeypatch.chdir(tmp_path)
    stale = paths.REGIME_FIGURES / "ctr.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"an earlier run's figure")
    assert regime.run(Params()) == {}  # regime.pools defaults to none
    outs = git_tracked_outs("regime")
    assert paths.REGIME_REPORTS in outs and paths.REGIME_JSON in outs
    for out in outs:
        files = [out] if out.is_file() else [f for f in out.rglob("*") if f.is_file()]
        assert files, f"{out}: nothing in it for git to store"
    assert not stale.exists()
    assert paths.REGIME_PLOT.read_text().strip() == "[]"
