"""Start `ptum pretrain` as M processes on each of N machines (`run_nodes`, `ptum pretrain
--nnodes N --node-rank R --rdzv-endpoint HOST:PORT`), with torch.distributed.elastic.

Torch's elastic agent (`elastic_launch`, in this process) with its c10d rendezvous
(`DynamicRendezvousHandler` on a `C10dRendezvousBackend`), registered under the name
`ptum-c10d` with three changes, all in `NodeRanked`: node 0 hosts the store on a socket bound to
HOST:PORT only, not on every interface (`ptum.stages.launch.host_store`); the workers bootstrap
from that same store instead of one more that the rendezvous would open on a random port of
every interface; and a node's group rank is its `--node-rank` (torch orders nodes by host name
and PID), so global rank 0, the rank that writes, runs on node 0, whose `ptum` holds the
output's lock. The store is unauthenticated: HOST must be on a private network or behind a
firewall. Ranks die with their machine's `ptum` (`die_with_agent`). A user's own `torchrun`
around `python -m ptum pretrain ...` works too: WORLD_SIZE is then set, ptum joins that group,
rank 0 takes the lock.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from torch.distributed.elastic.rendezvous import (
    RendezvousError,
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousStoreInfo,
    RendezvousTimeoutError,
)
from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler

from ptum.locks import die_with_parent
from ptum.stages.launch import host_store, loopback_interface

BACKEND = "ptum-c10d"  # the rendezvous backend `run_nodes` registers with torch
JOIN_TIMEOUT_S = 600  # how long a node waits for the others (torch's c10d rendezvous default)
AGENT_ENV = "PTUM_AGENT_PID"  # set in the ranks of `run_nodes`: the process that started them
RUN_KEY = "ptum/run_id"  # in node 0's store: the rendezvous id (configuration) of its run


class Stopped(RuntimeError):
    """This machine's `run_nodes` was stopped by a signal; it passed it on to its ranks (pre-
    training saves and stops). The CLI exits 128 + `signum`."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by signal {signum}; this machine's ranks were told to stop")
        self.signum = signum


class RendezvousFailed(ValueError):
    """The machines did not all meet, or lost each other. A ValueError: the CLI's error policy
    (`ptum.stages.errors.explain`) prints its message as the one-line error, exit code 2."""


def parse_endpoint(text: str) -> tuple[str, int]:
    """`HOST:PORT` (`[IPv6]:PORT`) -> (host, port); ValueError, one line, if it is not one."""
    host, sep, port = text.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536) or (
        ":" in host and not bracketed
    ):
        raise ValueError(
            f"--rdzv-endpoint {text!r}: expected HOST:PORT, node 0's address and a free port "
            "(e.g. 10.0.0.1:29400; [fd00::1]:29400 for IPv6)"
        )
    return host, int(port)


def check_nodes(nnodes: int, node_rank: int, endpoint: str | None) -> tuple[str, int] | None:
    """Check --nnodes / --node-rank / --rdzv-endpoint together: (host, port) of the rendezvous
    when the run spans several machines, None when it stays on this one; ValueError, one line."""
    if nnodes < 1:
        raise ValueError(f"--nnodes {nnodes}: the number of machines is at least 1")
    if not 0 <= node_rank < nnodes:
        raise ValueError(
            f"--node-rank {node_rank} is not in [0, {nnodes}): number the {nnodes} machines "
            f"0 to {nnodes - 1}, node 0 being the one at --rdzv-endpoint"
        )
    if nnodes == 1:
        if endpoint is not None:
            raise ValueError("--rdzv-endpoint is for several machines: give --nnodes too")
        return None
    if endpoint is None:
        raise ValueError(
            f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT: node 0's address, where it "
            "hosts the rendezvous, the same on every machine"
        )
    return parse_endpoint(endpoint)


class NodeRanked(RendezvousHandler):
    """torch's c10d rendezvous, each node ranked by its --node-rank, the workers bootstrapping
    from the rendezvous store (node 0's, bound to HOST:PORT) instead of a store of their own."""

    def __init__(self, inner: RendezvousHandler, *, node_rank: int, host: str, port: int) -> None:
        self._inner, self._node_rank, self._host, self._port = inner, node_rank, host, port

    @property
    def use_agent_store(self) -> bool:
        return True  # workers are clients of MASTER_ADDR:MASTER_PORT = node 0's store

    def next_rendezvous(self) -> RendezvousInfo:
        # Told not to share, torch's handler opens no second store (on every interface).
        with _environ({"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}):
            info = self._inner.next_rendezvous()
        if info.store.add(f"ptum/node_rank/{self._node_rank}", 1) != 1:
            raise ValueError(
                f"--node-rank {self._node_rank} is given to two machines: number the "
                f"{info.world_size} machines 0 to {info.world_size - 1}"
            )
        bootstrap = RendezvousStoreInfo(self._host, self._port)
        return RendezvousInfo(info.store, self._node_rank, info.world_size, bootstrap)

    def get_backend(self) -> str:
        return BACKEND

    def is_closed(self) -> bool:
        return self._inner.is_closed()

    def set_closed(self) -> None:
        self._inner.set_closed()

    def num_nodes_waiting(self) -> int:
        return self._inner.num_nodes_waiting()

    def get_run_id(self) -> str:
        return self._inner.get_run_id()

    def shutdown(self) -> bool:
        return self._inner.shutdown()


def node_store(host: str, port: int, *, node_rank: int, run_id: str) -> Any:
    """The rendezvous store: node 0 hosts it on `host`:`port` only, the other nodes connect
    (waiting up to JOIN_TIMEOUT_S for node 0). ValueError, one line, for a node whose `run_id`
    (its configuration) is not node 0's."""
    from torch.distributed import TCPStore

    if node_rank == 0:
        try:
            store, _ = host_store(host, port)
        except ValueError as e:
            raise ValueError(f"--rdzv-endpoint {e}: node 0 runs on that machine") from None
    else:
        try:
            store = TCPStore(host, port, is_master=False, timeout=timedelta(seconds=JOIN_TIMEOUT_S))
        except (RuntimeError, TimeoutError) as e:  # DistNetworkError, DistStoreError
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"--rdzv-endpoint {host}:{port}: no rendezvous there ({reason}); start node 0 "
                "(--node-rank 0) with this endpoint and check that this machine can reach it"
            ) from None
    seen = store.compare_set(RUN_KEY, "", run_id).decode()
    if seen != run_id:
        raise ValueError(
            f"node 0 at {host}:{port} runs another configuration (rendezvous {seen}, this "
            f"machine {run_id}): give every machine the same params, --set, --arch and --out"
        )
    return store


def _handler(params: RendezvousParameters) -> RendezvousHandler:
    """The `ptum-c10d` backend: torch's c10d rendezvous (as `--rdzv-backend c10d` builds it) on
    `node_store`, ranked by `node_rank` (a rendezvous config)."""
    host, port = parse_endpoint(params.endpoint)
    node_rank = int(params.config["node_rank"])
    store = node_store(host, port, node_rank=node_rank, run_id=params.run_id)
    inner = create_handler(store, C10dRendezvousBackend(store, params.run_id), params)
    return NodeRanked(inner, node_rank=node_rank, host=host, port=port)


def node_env(base: Mapping[str, str], host: str) -> dict[str, str]:
    """What `run_nodes` adds to its ranks' environment (`base`: theirs, which wins)."""
    env = {AGENT_ENV: str(os.getpid())}
    if "OMP_NUM_THREADS" not in base:
        env["OMP_NUM_THREADS"] = "1"  # as torchrun: one thread per rank unless told
    if _is_loopback(host):  # every node on this machine: nothing need listen beyond it
        for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            if name not in base:
                env[name] = loopback_interface()
    return env


def _is_loopback(host: str) -> bool:
    try:
        address = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0]
    except OSError:
        return False
    return ipaddress.ip_address(str(address).split("%")[0]).is_loopback


@contextmanager
def _environ(values: Mapping[str, str]) -> Iterator[None]:
    """os.environ with `values` for the block (torch reads some settings, and its agent its
    workers' environment, from there)."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_nodes(
    args: Sequence[str], *, nnodes: int, node_rank: int, endpoint: str, nproc: int, run_id: str
) -> None:
    """Run `python ARGS` as this machine's `nproc` ranks of a group over `nnodes` machines,
    node `node_rank` of them, that meet at `endpoint` (node 0 hosts the rendezvous there; all
    must give the same `run_id`). Global ranks follow node ranks: node 0 runs ranks 0..nproc-1.
    CalledProcessError if a rank fails; Stopped if this process gets SIGTERM/SIGINT."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import rendezvous_handler_registry
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    host, _ = parse_endpoint(endpoint)
    rendezvous_handler_registry.register(BACKEND, _handler)  # again: a no-op
    config = LaunchConfig(
        min_nodes=nnodes,
        max_nodes=nnodes,
        nproc_per_node=nproc,
        run_id=run_id,
        rdzv_backend=BACKEND,
        rdzv_endpoint=endpoint,
        rdzv_configs={"node_rank": node_rank, "join_timeout": JOIN_TIMEOUT_S},
        max_restarts=0,  # a failed rank fails the run; rerunning resumes from its checkpoint
        monitor_interval=0.2,
    )
    try:
        with _environ(node_env(os.environ, host)):
            elastic_launch(config, sys.executable)(*args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        cmd = [sys.executable, *args, f"(rank {rank}, on node {node_rank} of {nnodes})"]
        raise subprocess.CalledProcessError(failure.exitcode, cmd) from None
    except SignalException as e:
        raise Stopped(int(e.sigval)) from None
    except RendezvousError as e:
        raise _failed_rendezvous(e, endpoint, nnodes) from None


def _failed_rendezvous(e: Exception, endpoint: str, nnodes: int) -> RendezvousFailed:
    if isinstance(e, RendezvousTimeoutError):
        return RendezvousFailed(
            f"--rdzv-endpoint {endpoint}: not all {nnodes} machines joined within "
            f"{JOIN_TIMEOUT_S}s; start `ptum pretrain` on each, with --node-rank 0 to "
            f"{nnodes - 1}, the same --nnodes and --rdzv-endpoint"
        )
    reason = (str(e).strip().splitlines() or [""])[0]
    return RendezvousFailed(
        f"--rdzv-endpoint {endpoint}: lost the other machines ({type(e).__name__}: {reason}); "
        "one of them stopped or cannot be reached: rerun on every machine (pre-training resumes "
        "from its last checkpoint)"
    )


def die_with_agent() -> None:
    """In a rank of `run_nodes`: die (SIGKILL) when the process that started it dies (Linux).

    `ptum.locks.stop_with_parent`, which `ptum` itself arms, stands aside here: torch's agent
    starts each rank in a session of its own, and that is how `setsid ptum` asks to outlive.
    SIGKILL, not SIGTERM: a rank told to stop saves, and a save is collective (rank 0 writes,
    every rank waits at a barrier) while the ranks of the other machines, told nothing, go on
    training: it would wait for ever. Dead, it fails its peers' next all-reduce, every machine
    stops, and a rerun resumes from the last complete checkpoint (saves are atomic)."""
    agent = os.environ.get(AGENT_ENV)
    if agent is None or not sys.platform.startswith("linux"):
        return
    die_with_parent(signal.SIGKILL)
    if os.getppid() != int(agent):  # the agent died before the signal was armed
        os.kill(os.getpid(), signal.SIGKILL)
