"""The grid on a Dask cluster: the same results as the local pool, cell by cell; a clear error
for a scheduler that does not answer or a worker that does not see the files; a killed worker's
cells run again."""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import replace

import pytest

from ptum.config import FinetuneConfig
from ptum.finetune import dask_cells
from ptum.finetune.baselines import DEMO_BASELINES
from ptum.finetune.cells import Cell, GridAxes
from ptum.finetune.grid import run_grid
from ptum.finetune.workers import WorkerSpec
from ptum.stages.errors import explain

CFG = FinetuneConfig(max_epochs=1, head_hidden=8, workers=2, class_weights=("none",))
AXES = GridAxes(
    task="demo",
    labels=("gender",),
    models=("hsa",),
    modes=("scratch", "finetune"),
    ratios=(1.0,),
    repeats=1,
    baselines=True,
)


def _strip(runs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in runs]


def test_a_local_dask_cluster_gives_the_local_pools_results(options, tmp_path, capfd):
    local = run_grid(AXES, options(CFG, tmp_path / "local"))
    dask = run_grid(AXES, options(replace(CFG, executor="dask"), tmp_path / "dask"))
    assert len(dask) == len(DEMO_BASELINES) + 2
    for a, b in zip(_strip(local), _strip(dask), strict=True):
        assert a == b, (a["model"], a["mode"])  # metrics and every test prediction
    err = capfd.readouterr().err
    assert "dask: 2 workers on a LocalCluster on 127.0.0.1; dashboard http://127.0.0.1:" in err
    assert len(list((tmp_path / "dask").glob("*.json"))) == len(dask)  # the client cached them


def test_a_scheduler_that_does_not_answer_is_one_clear_line(options, tmp_path, monkeypatch):
    monkeypatch.setattr(dask_cells, "CONNECT_TIMEOUT_S", 1)
    cfg = replace(CFG, executor="dask", scheduler_address="tcp://127.0.0.1:1")
    with pytest.raises(ConnectionError) as e:
        run_grid(AXES, options(cfg, tmp_path))
    line = explain(e.value)
    assert line is not None and "\n" not in line
    assert "Dask scheduler 'tcp://127.0.0.1:1': cannot connect within 1 s" in line
    assert "dask scheduler" in line


def test_a_worker_that_does_not_see_the_files_names_the_path(tmp_path):
    missing = tmp_path / "not-shared" / "prepared"
    spec = WorkerSpec(
        task="demo",
        prepared=missing,
        tokenized=tmp_path,
        max_behaviors=20,
        ratios=(1.0,),
        ckpt_dirs={},
        threads=1,
        factors=False,
    )
    with pytest.raises(FileNotFoundError) as e:
        dask_cells.finetune_cell(spec, Cell("demo", "gender", "majority", "baseline", 1.0, 1), None)
    line = explain(e.value)
    assert line is not None and "\n" not in line
    assert line.startswith(f"{missing}: not found on Dask worker ") and "shared filesystem" in line


@pytest.mark.slow
def test_the_cells_of_a_killed_worker_run_again(options, tmp_path):
    """SIGKILL a worker process that runs a cell once the first cell is cached: every cell
    still comes back, with the local pool's results."""
    from distributed import Client, LocalCluster

    axes = replace(AXES, repeats=2, baselines=False)  # 4 neural cells
    cache = tmp_path / "dask"
    cfg = replace(CFG, executor="dask")
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        pids = client.run(os.getpid)
        cfg = replace(cfg, scheduler_address=cluster.scheduler_address)
        runs: list[list[dict]] = []
        grid = threading.Thread(target=lambda: runs.append(run_grid(axes, options(cfg, cache))))
        grid.start()
        deadline = time.time() + 60
        while not list(cache.glob("*.json")) and time.time() < deadline:
            time.sleep(0.05)
        busy = [w for w, keys in client.processing().items() if keys]
        assert busy, "no cell left running: the grid is too short to kill a worker in it"
        os.kill(pids[busy[0]], signal.SIGKILL)
        grid.join(timeout=120)
        assert runs, "the grid did not finish"
        assert busy[0] not in client.run(os.getpid)  # the killed worker's cell ran elsewhere
    assert _strip(runs[0]) == _strip(run_grid(axes, options(CFG, tmp_path / "local")))
