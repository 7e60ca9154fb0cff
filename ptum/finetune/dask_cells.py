"""The grid's cells on a Dask cluster (executor "dask"): docs/evaluation.md#grid-on-a-dask-cluster.

The stage's process is the cluster's client: it submits every cell as a task and takes the
results as they finish; it alone writes the cell cache. A worker process loads its `Worker`
when it runs its first cell of a grid and keeps it for the next ones (`finetune_cell`), from
the absolute paths of the `WorkerSpec`: every worker must see the stage's data and checkpoints
at those paths (a shared filesystem), which it checks before loading. A worker process runs one
cell at a time, on one torch thread, as a local pool process does, so a cell's result is the
same on either.

Retries: a cell whose worker dies (killed, out of memory, machine lost) is run again on another
worker by the scheduler, until it has taken down ALLOWED_FAILURES + 1 workers (Dask's
`distributed.scheduler.allowed-failures`, set here for the local cluster; an external
scheduler's own setting applies, 3 by default); then KilledWorker ends the grid, keeping the
cells already cached. A cell that raises is not retried: cells are deterministic, it would
raise again.
"""

from __future__ import annotations

import importlib.util
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ptum.finetune.cell import Worker, run_cell
from ptum.finetune.cells import Cell, GridOptions
from ptum.finetune.workers import WorkerSpec, load_worker

if TYPE_CHECKING:
    from distributed import Client

ALLOWED_FAILURES = 3  # worker deaths after which a cell still runs again (the next fails it)
CONNECT_TIMEOUT_S = 20  # for the scheduler to answer, then for a first worker to join


def run_on_dask(
    todo: list[Cell], spec: WorkerSpec, options: GridOptions, *, address: str, workers: int
) -> Iterator[tuple[Cell, dict]]:
    """(cell, result) for every cell of `todo` as it finishes on the cluster of `address`
    ("": a LocalCluster of `workers` processes on 127.0.0.1, closed afterwards)."""
    from distributed import as_completed

    with _client(address, workers) as client:
        _announce(client, address)
        futures = {
            client.submit(finetune_cell, spec, c, options, pure=False, retries=0): c for c in todo
        }
        for future in as_completed(futures, loop=client.loop):
            yield futures[future], future.result()
        if address:  # an external cluster's workers live on: free the task's data and models
            client.run(release, on_error="ignore")


@contextmanager
def _client(address: str, workers: int) -> Iterator[Client]:
    """A client of the scheduler at `address`, or of a LocalCluster that listens on the
    loopback interface only (its scheduler, workers and dashboard)."""
    from distributed import Client, LocalCluster

    if not address:
        with (
            LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,  # spawned (Dask's default), like the local pool
                host="127.0.0.1",
                dashboard_address="127.0.0.1:0",
                # No pause or restart at a share of this machine's memory: a worker holds the
                # whole task and its models, as a local pool process does (which has no limit).
                memory_limit=0,
                scheduler_kwargs={"allowed_failures": ALLOWED_FAILURES},
            ) as cluster,
            Client(cluster, set_as_default=False) as client,
        ):
            yield client
        return
    try:
        client = Client(address, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
    except (OSError, ValueError, TypeError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConnectionError(
            f"Dask scheduler {address!r}: cannot connect within {CONNECT_TIMEOUT_S} s ({reason}); "
            "start it with `dask scheduler` and give its address (tcp://HOST:8786), or leave "
            "the address empty for a local cluster"
        ) from exc
    with client:
        try:
            client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_S)
        except TimeoutError as exc:
            raise ConnectionError(
                f"Dask scheduler {address!r}: no worker joined within {CONNECT_TIMEOUT_S} s; "
                f"start workers with `dask worker {address} --nthreads 1`"
            ) from exc
        yield client


def _announce(client: Client, address: str) -> None:
    """One line on stderr: the cluster, its workers and the dashboard's link."""
    threads = client.nthreads()
    where = address or "a LocalCluster on 127.0.0.1"
    link = client.dashboard_link
    if not address and importlib.util.find_spec("bokeh") is None:
        link += " (its pages need `pip install bokeh`)"
    print(f"dask: {len(threads)} workers on {where}; dashboard {link}", file=sys.stderr, flush=True)
    if any(n > 1 for n in threads.values()):
        print(
            "dask: workers with several threads still run one cell at a time (cells seed "
            "torch's global generator): start them with `--nthreads 1`",
            file=sys.stderr,
            flush=True,
        )


# ---------------------------------------------------------------- on a Dask worker

# This worker process's Worker and the spec it was loaded from: loaded by the first cell of a
# grid, reused by the next cells with the same spec. The lock runs one cell at a time in the
# process, whatever its thread count: a cell seeds torch's process-wide generator.
_LOADED: tuple[WorkerSpec, Worker] | None = None
_LOCK = threading.Lock()


def finetune_cell(spec: WorkerSpec, cell: Cell, options: GridOptions) -> dict:
    """The cell's result (the task a Dask worker runs)."""
    global _LOADED
    with _LOCK:
        if _LOADED is None or _LOADED[0] != spec:
            _LOADED = None  # the previous grid's data and models go before the next load
            check_shared(spec)
            _LOADED = (spec, load_worker(spec))
        return run_cell(_LOADED[1], cell, options)


def release() -> None:
    """Drop this worker process's Worker (run on every worker when a grid ends)."""
    global _LOADED
    with _LOCK:
        _LOADED = None


def check_shared(spec: WorkerSpec) -> None:
    """Refuse, naming the path, when this machine does not see an input of the grid."""
    for path in spec.inputs():
        if not path.exists():
            raise FileNotFoundError(
                f"{path}: not found on Dask worker {socket.gethostname()}; the workers need the "
                "stage's data and checkpoints on a shared filesystem, at the same absolute path"
            )
