"""The cell cache: entries verified by the hash written with them, keys that change with what a
cell's result depends on (and only with that)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ptum.config import FinetuneConfig
from ptum.finetune.cache import CacheEntryCorrupt, CellKeys, read_entry, write_entry
from ptum.finetune.cells import Cell, GridAxes
from ptum.finetune.grid import run_grid
from ptum.stages.finetune import cell_options
from tests.finetune.conftest import SPLIT


def test_an_entry_reads_back_and_an_edited_one_is_refused(tmp_path):
    path = tmp_path / "k.json"
    write_entry(path, "k", {"test": {"acc": 0.5}, "n_test": 3})
    assert read_entry(path, "k") == {"test": {"acc": 0.5}, "n_test": 3}
    with pytest.raises(CacheEntryCorrupt, match="k.json"):
        read_entry(path, "other-key")  # another cell's file
    path.write_text(path.read_text().replace("0.5", "0.9"))
    with pytest.raises(CacheEntryCorrupt, match="does not match the hash"):
        read_entry(path, "k")
    path.write_text(path.read_text()[:10])  # truncated
    with pytest.raises(CacheEntryCorrupt):
        read_entry(path, "k")


def _keys(**changes) -> CellKeys:
    keys = CellKeys(
        opts=cell_options(FinetuneConfig()),
        demo_select="acc",
        class_weights=("none",),
        split=SPLIT,
        model_hashes={"hsa": "h1"},
        data_hash="d",
        code_hash="c",
    )
    return replace(keys, **changes)


def test_a_key_changes_with_every_input_a_neural_cell_reads():
    cell = Cell("demo", "gender", "hsa", "finetune", 0.5, 100)
    base = _keys().key(cell)
    assert len(base) == 24 and base == _keys().key(cell)
    changed = [
        _keys(opts=replace(cell_options(FinetuneConfig()), lr=0.5)),
        _keys(demo_select="macro_f1"),
        _keys(class_weights=("none", "balanced")),
        _keys(split=replace(SPLIT, ctr_valid_frac=0.2)),
        _keys(model_hashes={"hsa": "h2"}),
        _keys(data_hash="d2"),
        _keys(code_hash="c2"),
    ]
    assert all(k.key(cell) != base for k in changed)
    assert _keys().key(replace(cell, seed=101)) != base


def test_a_baseline_key_ignores_the_neural_options():
    cell = Cell("demo", "gender", "tfidf_lr", "baseline", 0.5, 100)
    base = _keys().key(cell)
    assert _keys(opts=replace(cell_options(FinetuneConfig()), lr=0.5)).key(cell) == base
    assert _keys(class_weights=("balanced",)).key(cell) == base
    assert _keys(demo_select="macro_f1").key(cell) != base


def test_an_edited_cache_entry_is_refused_by_name(options, tmp_path):
    cfg = FinetuneConfig(max_epochs=1, head_hidden=8, workers=1, class_weights=("none",))
    axes = GridAxes(
        task="demo",
        labels=("gender",),
        models=("hsa",),
        modes=("scratch",),
        ratios=(1.0,),
        repeats=1,
        baselines=False,
    )
    first = run_grid(axes, options(cfg))
    (entry,) = sorted((tmp_path / "cache").glob("*.json"))
    text = entry.read_text()
    entry.write_text(text.replace('"acc": ', '"acc": 0.99, "was": ', 1))
    with pytest.raises(CacheEntryCorrupt, match=entry.name):
        run_grid(axes, options(cfg))
    entry.write_text(text)  # restored: accepted again, and read, not recomputed
    again = run_grid(axes, options(cfg))
    assert again == first and again[0]["seconds"] == first[0]["seconds"]
