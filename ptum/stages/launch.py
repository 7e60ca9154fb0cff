"""Start `ptum pretrain` as a data-parallel group of N processes on this machine
(`run_local`, loopback only); several machines are `ptum.stages.multinode`'s.

`run_local` replaces `torchrun --standalone`. In torch 2.13 torchrun's rendezvous stores (the
c10d store of `--standalone` or of any `--rdzv-endpoint`, and the store it shares with the
workers) listen on every network interface whatever host they are given: an unauthenticated
key-value store that any machine on the network could write to. Here this process hosts the
group's one TCPStore on a socket it binds to 127.0.0.1 itself (`master_listen_fd`), and every
rank connects to it as a client (TORCHELASTIC_USE_AGENT_STORE: the arrangement torchrun uses
with its agent); gloo and NCCL are pointed at the loopback interface too. Nothing listens beyond
this machine. Ranks die with this process (Linux: a parent-death signal), and when one rank
fails the others are stopped. They write under this process's lock of the output
(`ptum.locks`: the CLI took it, PTUM_HELD_LOCKS tells the ranks).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

from ptum.locks import die_with_parent

LOOPBACK = "127.0.0.1"
STORE_TIMEOUT_S = 300  # how long a rank waits for the others at the rendezvous


def loopback_interface() -> str:
    """The loopback interface's name (`lo` on Linux, `lo0` on macOS and the BSDs)."""
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in ("lo", "lo0") if n in names), "lo")


def rank_env(base: Mapping[str, str], *, rank: int, nproc: int, port: int) -> dict[str, str]:
    """The environment of local rank `rank` of `nproc`, its store at 127.0.0.1:`port`."""
    env = dict(base)
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        GROUP_RANK="0",
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
        MASTER_ADDR=LOOPBACK,
        MASTER_PORT=str(port),
        # init_process_group("env://") then connects to our store instead of hosting one.
        TORCHELASTIC_USE_AGENT_STORE="True",
    )
    interface = loopback_interface()
    env.setdefault("GLOO_SOCKET_IFNAME", interface)  # gloo's pair sockets
    env.setdefault("NCCL_SOCKET_IFNAME", interface)  # NCCL's bootstrap sockets
    env.setdefault("OMP_NUM_THREADS", "1")  # as torchrun: one thread per rank unless told
    return env


def host_store(host: str = LOOPBACK, port: int = 0) -> tuple[Any, int]:
    """A TCPStore server listening on `host`:`port` only (default: 127.0.0.1, a free port);
    returns (store, port). ValueError, one line, when it cannot listen there."""
    from torch.distributed import TCPStore

    sock = _listen(host, port)
    port = sock.getsockname()[1]
    store = TCPStore(
        host,
        port,
        is_master=True,
        wait_for_workers=False,
        timeout=timedelta(seconds=STORE_TIMEOUT_S),
        master_listen_fd=sock.detach(),  # the store's server owns the bound socket now
    )
    return store, port


def _listen(host: str, port: int) -> socket.socket:
    """A socket listening on `host`'s address, not on every interface (TCPStore's own does)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise ValueError(f"{host}: cannot resolve this address ({e})") from None
    try:
        # A restarted node 0 can bind again at once (Linux: two listeners still cannot).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise ValueError(
            f"{host}:{port}: cannot listen there ({e.strerror}); give this machine's own address "
            "and a free port"
        ) from None
    return sock


def _first_failure(procs: list[subprocess.Popen], poll_s: float) -> tuple[int, int] | None:
    """Wait until every rank has exited 0 (None) or one has failed: (rank, exit status)."""
    while True:
        codes = [p.poll() for p in procs]
        for rank, code in enumerate(codes):
            if code not in (None, 0):
                return rank, code
        if all(code == 0 for code in codes):
            return None
        time.sleep(poll_s)


def _stop(procs: list[subprocess.Popen], grace_s: float = 30.0) -> None:
    """SIGTERM the ranks still running (pre-training saves and stops), then SIGKILL."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_local(
    args: Sequence[str],
    nproc: int,
    *,
    env: Mapping[str, str] | None = None,
    poll_s: float = 0.2,
) -> None:
    """Run `python ARGS` as ranks 0..nproc-1 of one group; CalledProcessError if one fails."""
    store, port = host_store()
    cmd = [sys.executable, *args]
    procs: list[subprocess.Popen] = []
    try:
        for rank in range(nproc):
            procs.append(
                subprocess.Popen(
                    cmd,
                    env=rank_env(
                        os.environ if env is None else env, rank=rank, nproc=nproc, port=port
                    ),
                    preexec_fn=die_with_parent,  # SIGTERM when we die
                )
            )
        failure = _first_failure(procs, poll_s)
    finally:
        _stop(procs)
        del store
    if failure is not None:
        rank, code = failure
        raise subprocess.CalledProcessError(code, [*cmd, f"(rank {rank} of {nproc})"])
