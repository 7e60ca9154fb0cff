"""`ptum pretrain --nproc N`: the ranks' rendezvous listens on 127.0.0.1 only.

torchrun's stores (torch 2.13) listen on every interface whatever endpoint they are given, so
ptum.stages.launch hosts the store itself on a socket bound to loopback. These tests read the
kernel's socket table (/proc/net/tcp*) for the listening sockets of the launching process and
its ranks.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from ptum.stages import launch

LINUX = sys.platform.startswith("linux") and Path("/proc/net/tcp").exists()


def _listening(pids: set[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state owned by one of `pids`."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A = LISTEN
                continue
            addr_hex, port_hex = local.split(":")
            raw = bytes.fromhex(addr_hex)
            # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.add((socket.inet_ntop(family, raw), int(port_hex, 16)))
    return found


def _children(pid: int) -> set[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def test_rank_env_points_every_rank_at_a_loopback_store():
    env = launch.rank_env({"PATH": "/bin"}, rank=1, nproc=2, port=1234)
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"] == "1234"
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == ("1", "1", "2")
    assert env["TORCHELASTIC_USE_AGENT_STORE"] == "True"  # ranks are clients of our store
    assert env["GLOO_SOCKET_IFNAME"] == launch.loopback_interface()
    assert env["PATH"] == "/bin"
    # A user's own choice of interface is kept.
    assert (
        launch.rank_env({"GLOO_SOCKET_IFNAME": "eth1"}, rank=0, nproc=2, port=1)[
            "GLOO_SOCKET_IFNAME"
        ]
        == "eth1"
    )


@pytest.mark.skipif(not LINUX, reason="reads /proc/net/tcp")
def test_the_store_listens_on_loopback_only():
    store, port = launch.host_store()
    try:
        mine = {p for a, p in _listening({os.getpid()}) if p == port}
        assert mine == {port}
        assert _listening({os.getpid()}) >= {("127.0.0.1", port)}
        assert not [a for a, p in _listening({os.getpid()}) if p == port and a != "127.0.0.1"]
    finally:
        del store


def test_pretrain_runs_ranks_through_the_loopback_launcher(monkeypatch):
    seen = {}
    monkeypatch.setattr(launch, "run_local", lambda args, n: seen.update(args=args, n=n))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    from ptum.config import Params
    from ptum.stages import pretrain

    monkeypatch.setattr(pretrain.json, "loads", lambda text: {"read": True})
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: "{}")
    out = pretrain.run(Params(), arch="hsa", nproc=2, command=["pretrain", "--arch", "hsa"])
    assert out == {"read": True}
    assert seen == {"args": ["-m", "ptum", "pretrain", "--arch", "hsa"], "n": 2}


RANK_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import torch, torch.distributed as dist
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    open(os.path.join(sys.argv[1], f"rank{rank}"), "w").write(str(t.item()))
    time.sleep(3)  # the test reads the socket table meanwhile
    dist.barrier()
    dist.destroy_process_group()
    if rank == 1 and len(sys.argv) > 2:
        sys.exit(3)
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not LINUX, reason="reads /proc/net/tcp")
def test_two_ranks_form_a_group_with_nothing_listening_beyond_loopback(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = threading.Event()
    errors: list[BaseException] = []

    def launch_ranks():
        try:
            launch.run_local([str(script), str(tmp_path)], 2, env=env)
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            errors.append(e)
        finally:
            done.set()

    thread = threading.Thread(target=launch_ranks)
    thread.start()
    listening: set[tuple[str, int]] = set()
    while not done.is_set():
        if (tmp_path / "rank0").exists() and (tmp_path / "rank1").exists():
            listening |= _listening({os.getpid(), *_children(os.getpid())})
        time.sleep(0.2)
    thread.join()
    assert not errors, errors
    assert (tmp_path / "rank0").read_text() == "3.0"  # 1 + 2: the group really reduced
    assert listening, "no listening socket seen while the ranks ran"
    assert {a for a, _ in listening} == {"127.0.0.1"}, listening


@pytest.mark.slow
def test_a_failing_rank_fails_the_launch(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    with pytest.raises(subprocess.CalledProcessError) as e:
        launch.run_local([str(script), str(tmp_path), "fail"], 2, env=dict(os.environ))
    assert e.value.returncode == 3 and "(rank 1 of 2)" in e.value.cmd[-1]


LOCKING_RANK = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from ptum import locks
    with locks.holding([Path(sys.argv[1])]):
        Path(sys.argv[1], "rank" + os.environ["RANK"]).write_text("ran")
    """
)


def test_ranks_run_under_the_launchers_lock_of_the_output(tmp_path, monkeypatch):
    """`ptum pretrain --nproc 2`: the launching process holds the output's lock and its ranks,
    which take the lock of the same output, neither wait nor refuse."""
    from ptum import locks

    script, out = tmp_path / "rank.py", tmp_path / "out"
    script.write_text(LOCKING_RANK)
    out.mkdir()
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[2]))
    monkeypatch.delenv(locks.HELD_ENV, raising=False)
    with locks.holding([out]):
        launch.run_local([str(script), str(out)], 2)  # the ranks get this environment
        unaware = {k: v for k, v in os.environ.items() if k != locks.HELD_ENV}
        # Ranks not told of the launcher's lock would be refused.
        with pytest.raises(subprocess.CalledProcessError):
            launch.run_local([str(script), str(out)], 2, env=unaware)
    assert sorted(p.name for p in out.iterdir()) == ["rank0", "rank1"]
