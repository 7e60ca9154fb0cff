"""The grid: which cells it holds, every method of a repeat on the same split, cached cells,
cells in worker processes (same results, and no worker outlives a killed parent)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ptum.config import FinetuneConfig
from ptum.finetune.baselines import CTR_BASELINES, DEMO_BASELINES
from ptum.finetune.cells import Cell, GridAxes
from ptum.finetune.grid import grid_cells, run_grid

RATIOS = (0.2, 0.5, 1.0)
CFG = FinetuneConfig(max_epochs=1, head_hidden=8, workers=1, class_weights=("none",))


def _axes(**kw) -> GridAxes:
    axes = dict(
        task="demo",
        labels=None,
        models=(),
        modes=(),
        ratios=RATIOS,
        repeats=2,
        baselines=True,
    )
    return GridAxes(**(axes | kw))


def test_grid_cells_are_baselines_first_then_every_neural_combination():
    axes = _axes(task="ctr", models=("a", "b"), modes=("scratch", "finetune"), ratios=(0.5, 1.0))
    cells = grid_cells(axes, ["click"], seed=100)
    n_base = len(CTR_BASELINES) * 2 * 2
    assert len(cells) == n_base + 2 * 2 * 2 * 2 and len(set(cells)) == len(cells)
    assert {c.mode for c in cells[:n_base]} == {"baseline"}
    assert cells[n_base] == Cell("ctr", "click", "a", "scratch", 0.5, 100)
    assert cells[n_base + 1] == Cell("ctr", "click", "a", "scratch", 0.5, 101)  # repeats last
    assert {c.seed for c in cells} == {100, 101}
    assert grid_cells(_axes(baselines=False, models=("a",), modes=("frozen",)), ["g"], 7) == [
        Cell("demo", "g", "a", "frozen", r, 7 + k) for r in RATIOS for k in range(2)
    ]


@pytest.mark.parametrize(
    "bad, match", [({"modes": ("scratch", "warm")}, "unknown"), ({"repeats": 0}, ">= 1")]
)
def test_axes_refuse_an_unknown_mode_and_no_repeat(bad, match):
    with pytest.raises(ValueError, match=match):
        _axes(**bad)


def test_grid_gives_every_method_of_a_repeat_the_same_split(options):
    runs = run_grid(_axes(), options(CFG))
    rows = {(r["model"], r["label"], r["ratio"], r["seed"]): r["pred"]["row"] for r in runs}
    assert {m for m, *_ in rows} == set(DEMO_BASELINES)
    for (_m, label, _ratio, seed), test_rows in rows.items():
        assert test_rows == rows[("majority", label, 0.2, seed)]
    assert rows[("tfidf_lr", "gender", 0.2, 100)] != rows[("tfidf_lr", "gender", 0.2, 101)]


def test_a_baseline_cell_is_recomputed_when_the_selection_metric_changes(options, tmp_path):
    axes = _axes(labels=("gender",), ratios=(1.0,), repeats=1)
    cache = tmp_path / "cache"
    run_grid(axes, options(CFG))
    n = len(list(cache.glob("*.json")))
    assert n == len(DEMO_BASELINES)
    run_grid(axes, options(CFG))
    assert len(list(cache.glob("*.json"))) == n  # same key: cached
    run_grid(axes, options(FinetuneConfig(workers=1, demo_select="macro_f1")))
    assert len(list(cache.glob("*.json"))) == 2 * n  # new key per cell


def test_worker_processes_give_the_results_of_one_process(options, tmp_path):
    axes = _axes(labels=("gender",), models=("hsa",), modes=("scratch", "frozen"), ratios=(1.0,))
    one = run_grid(axes, options(CFG, tmp_path / "one"))
    two = run_grid(axes, options(replace(CFG, workers=2), tmp_path / "two"))

    def strip(runs: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in runs]

    assert len(one) == len(DEMO_BASELINES) * 2 + 2 * 2
    assert strip(one) == strip(two)


def test_pool_workers_die_with_a_killed_parent(tiny_pipeline, ckpts, tmp_path):
    """SIGKILL the process running a 2-worker grid: no worker survives it."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    script = f"""
from pathlib import Path
from ptum.config import FinetuneConfig
from ptum.finetune.cells import GridAxes, SplitSpec
from ptum.finetune.grid import run_grid
from ptum.stages.finetune import grid_options
cfg = FinetuneConfig(max_epochs=50, patience=50, head_hidden=8, workers=2)
axes = GridAxes(task="demo", labels=None, models=("hsa",), modes=("scratch", "finetune"),
                ratios=(1.0,), repeats=8, baselines=False)
options = grid_options(cfg, split=SplitSpec((0.8, 0.1, 0.1), 0.1),
                       prepared=Path({str(tiny_pipeline / "prepared")!r}),
                       tokenized=Path({str(tiny_pipeline / "tokenized")!r}), max_behaviors=20,
                       ckpt_root=Path({str(ckpts)!r}), cache_dir=Path({str(tmp_path)!r}))
run_grid(axes, options)
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen([sys.executable, "-c", script], env=env)

    def children() -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(parent.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    deadline = time.time() + 60
    while len(children()) < 2 and time.time() < deadline:  # the pool's workers (+ tracker)
        time.sleep(0.2)
    workers = children()
    assert len(workers) >= 2
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()

    def running(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
        except OSError:  # gone (and reaped)
            return False

    # A worker killed while it still imports torch notices only when its start-up ends (it
    # then finds its parent gone): on a slow machine that takes seconds, hence the deadline.
    deadline = time.time() + 90
    alive = workers
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = [p for p in workers if running(p)]
    assert alive == [], f"orphaned workers {alive}"
