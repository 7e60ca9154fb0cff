"""Where the grid's cells run: in this process, in a pool of spawned local processes
(executor "local"), or on a Dask cluster (executor "dask", ptum.finetune.dask_cells).

Each process that runs cells loads its `Worker` once (ptum.finetune.workers) and runs cell
after cell on it; results come back to the grid, in the stage's process, which alone writes
the cell cache. A cell's result does not depend on where it ran: every cell seeds its own run,
and a process that runs cells beside others uses one torch thread.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed

from ptum.finetune.cell import Worker, run_cell
from ptum.finetune.cells import Cell, GridOptions
from ptum.finetune.workers import WorkerSpec, load_worker

EXECUTORS = ("local", "dask")  # GridOptions.executor (finetune.executor)


def run_cells(
    todo: list[Cell], spec: WorkerSpec, options: GridOptions
) -> Iterator[tuple[Cell, dict]]:
    """(cell, result) for every cell of `todo` as it finishes: on the Dask cluster of
    `options.scheduler_address`, in `options.workers` spawned processes, or in this one."""
    if options.executor not in EXECUTORS:
        raise ValueError(f"executor {options.executor!r}: choose from {list(EXECUTORS)}")
    if not todo:
        return
    if options.executor == "dask":
        # Imported here: distributed takes a while to import and only this path needs it.
        from ptum.finetune.dask_cells import run_on_dask

        yield from run_on_dask(
            todo, spec, options, address=options.scheduler_address, workers=options.workers
        )
    elif options.workers <= 1:
        worker = load_worker(spec)
        for c in todo:
            yield c, run_cell(worker, c, options)
    else:
        yield from _run_in_pool(todo, spec, options)


def _run_in_pool(
    todo: list[Cell], spec: WorkerSpec, options: GridOptions
) -> Iterator[tuple[Cell, dict]]:
    # spawn, not fork: a fork after torch has run (e.g. pre-training in this process) can
    # deadlock the child on OpenMP's thread pool.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=options.workers, initializer=_pool_init, initargs=(spec,), mp_context=ctx
    ) as pool:
        futures = {pool.submit(_pool_cell, c, options): c for c in todo}
        for future in as_completed(futures):
            yield futures[future], future.result()


# A pool process's Worker. ProcessPoolExecutor runs the initializer once per process but hands
# its return value to no task, and the Worker (the task's data and every model) is too large to
# send with each cell: so the initializer parks it here, and `_pool_cell` passes it on to
# run_cell explicitly. Only pool processes set it; the parent never reads it.
_POOL_WORKER: Worker | None = None


def _pool_init(spec: WorkerSpec) -> None:
    global _POOL_WORKER
    _die_with_parent()
    _POOL_WORKER = load_worker(spec)


def _pool_cell(cell: Cell, options: GridOptions) -> dict:
    assert _POOL_WORKER is not None, "called outside a pool process started by run_cells"
    return run_cell(_POOL_WORKER, cell, options)


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (a killed `ptum finetune` or
    `dvc repro` must not leave pool workers running); a no-op elsewhere."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)
