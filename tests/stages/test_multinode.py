"""`ptum pretrain --nnodes N --node-rank R --rdzv-endpoint HOST:PORT`: pre-training across
machines with torch's elastic agent and c10d rendezvous (`ptum.stages.multinode.run_nodes`).

Two "machines" here are two `ptum` processes on 127.0.0.1 sharing one project directory: they
must meet, not trip over the output's lock, and train exactly what `--nproc 2` trains.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ptum import cli, locks
from ptum.config import Params
from ptum.stages import launch, multinode
from ptum.stages.pretrain import rendezvous_id
from tests.pretrain.test_train import _project, _ptum, _weights
from tests.stages.test_launch import LINUX, _children, _listening
from tests.test_locks import gone_within

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("10.0.0.1:29400", ("10.0.0.1", 29400)), ("[fd00::1]:1", ("fd00::1", 1))],
)
def test_parse_endpoint(text, expected):
    assert multinode.parse_endpoint(text) == expected


@pytest.mark.parametrize("text", ["10.0.0.1", ":29400", "h:0", "h:65536", "h:x", "fd00::1:29400"])
def test_parse_endpoint_refuses_what_is_not_host_port(text):
    with pytest.raises(ValueError, match="expected HOST:PORT") as e:
        multinode.parse_endpoint(text)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nnodes", "2"], "--nnodes 2 needs --rdzv-endpoint HOST:PORT"),
        (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:1"], r"not in \[0, 2\)"),
        (["--nnodes", "2", "--node-rank", "-1", "--rdzv-endpoint", "h:1"], r"not in \[0, 2\)"),
        (["--nnodes", "0"], "at least 1"),
        (["--rdzv-endpoint", "h:1"], "give --nnodes too"),
        (["--nnodes", "2", "--rdzv-endpoint", "h"], "expected HOST:PORT"),
    ],
)
def test_bad_node_flags_are_one_line_errors(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cli.main(["pretrain", *argv, "--params", str(ROOT / "params.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ptum pretrain: error: ") and "\n" not in err
    assert re.search(message, err), err


def test_only_node_0_locks_the_output():
    p = Params()
    argv = ["pretrain", "--nnodes", "2", "--rdzv-endpoint", "h:1", "--node-rank"]
    assert cli.outputs(p, cli.build_parser().parse_args([*argv, "0"])) != []
    assert cli.outputs(p, cli.build_parser().parse_args([*argv, "1"])) == []


def test_node_0_refuses_at_once_when_another_run_writes_the_output(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["pretrain", "--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint", "127.0.0.1:1"]
    held = locks.acquire(Path("models/pretrain/hsa"))  # as another process would hold it
    try:
        assert cli.main([*argv, "--arch", "hsa", "--params", str(ROOT / "params.yaml")]) == 2
    finally:
        locks.release(*held)
    assert "another ptum process" in capsys.readouterr().err


def test_ranks_rerun_the_command_without_the_launch_options(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    seen = {}
    from ptum.stages import pretrain

    monkeypatch.setattr(pretrain, "run", lambda p, **kw: seen.update(kw) or {})
    argv = ["pretrain", "--nnodes", "2", "--node-rank=1", "--rdzv-endpoint", "h:1", "--nproc", "3"]
    assert cli.main([*argv, "--arch", "hsa", "--params", str(ROOT / "params.yaml")]) == 0
    assert seen["command"] == ["pretrain", "--arch", "hsa", "--params", str(ROOT / "params.yaml")]
    assert (seen["nnodes"], seen["node_rank"], seen["rdzv_endpoint"], seen["nproc"]) == (
        2,
        1,
        "h:1",
        3,
    )


def test_rendezvous_id_is_what_the_machines_must_agree_on():
    p = Params()
    same = rendezvous_id(p, "hsa", None)
    assert same == rendezvous_id(p, "hsa", None)
    # Each machine chooses its own number of processes.
    assert same == rendezvous_id(replace(p, pretrain=replace(p.pretrain, processes=4)), "hsa", None)
    assert same != rendezvous_id(replace(p, pretrain=replace(p.pretrain, lr=0.5)), "hsa", None)
    assert same != rendezvous_id(p, "han", None)
    assert same != rendezvous_id(p, "hsa", Path("elsewhere"))


def test_node_0_refuses_a_machine_with_another_configuration():
    port = _free_port()
    host = multinode.node_store("127.0.0.1", port, node_rank=0, run_id="a")
    try:
        multinode.node_store("127.0.0.1", port, node_rank=1, run_id="a")  # the same: welcome
        with pytest.raises(ValueError, match="runs another configuration.*rendezvous a"):
            multinode.node_store("127.0.0.1", port, node_rank=1, run_id="b")
    finally:
        del host


def test_node_0_must_be_the_machine_at_the_endpoint():
    with pytest.raises(ValueError, match=r"--rdzv-endpoint 192\.0\.2\.1:\d+: cannot listen there"):
        multinode.node_store("192.0.2.1", _free_port(), node_rank=0, run_id="a")  # TEST-NET-1


@pytest.mark.skipif(not LINUX, reason="reads /proc/net/tcp")
def test_node_0_listens_on_the_endpoints_address_only():
    port = _free_port()
    store = multinode.node_store("127.0.0.1", port, node_rank=0, run_id="a")
    try:
        assert {(a, p) for a, p in _listening({os.getpid()}) if p == port} == {("127.0.0.1", port)}
    finally:
        del store


def test_node_env_points_ranks_at_their_agent_and_loopback(monkeypatch):
    env = multinode.node_env({}, "127.0.0.1")
    assert env[multinode.AGENT_ENV].isdigit() and env["OMP_NUM_THREADS"] == "1"
    assert env["GLOO_SOCKET_IFNAME"] == launch.loopback_interface()
    # Another machine's address: gloo's interface is the user's choice (GLOO_SOCKET_IFNAME).
    assert "GLOO_SOCKET_IFNAME" not in multinode.node_env({}, "192.0.2.1")
    assert "OMP_NUM_THREADS" not in multinode.node_env({"OMP_NUM_THREADS": "4"}, "192.0.2.1")


# ---------------------------------------------------------------- two "machines" (subprocesses)


def _node(proj: Path, rank: int, endpoint: str) -> subprocess.Popen:
    flags = ["--nnodes", "2", "--node-rank", str(rank), "--rdzv-endpoint", endpoint]
    return _ptum(proj, "pretrain", "--arch", "hsa", *flags)


@pytest.mark.slow
def test_two_nodes_train_what_nproc_2_trains_bit_for_bit(tmp_path, tiny_pipeline):
    """Node 1 starts first and waits for node 0; both share one directory (node 0 holds its
    lock, node 1 takes none); the weights equal `--nproc 2`'s exactly (deterministic mode: the
    same world of 2 gloo ranks, the same shards, the same all-reduce)."""
    ref = _project(tmp_path / "ref", tiny_pipeline, epochs=2, batch_size=16)
    p = _ptum(ref, "pretrain", "--arch", "hsa", "--nproc", "2")
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0, out

    proj = _project(tmp_path / "nodes", tiny_pipeline, epochs=2, batch_size=16)
    endpoint = f"127.0.0.1:{_free_port()}"
    node1 = _node(proj, 1, endpoint)
    node0 = _node(proj, 0, endpoint)
    out0, out1 = node0.communicate(timeout=300)[0], node1.communicate(timeout=300)[0]
    assert node0.returncode == 0, out0
    assert node1.returncode == 0, out1
    assert '"node_rank": 1' in out1  # its summary: node 0 wrote the checkpoint

    a, b = _weights(ref), _weights(proj)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    h_ref = json.loads((ref / "reports/pretrain/hsa/history.json").read_text())
    h = json.loads((proj / "reports/pretrain/hsa/history.json").read_text())
    assert [e["valid_loss"] for e in h] == [e["valid_loss"] for e in h_ref]
    assert not list((proj / "models/pretrain").glob(".*.lock"))  # released


NODE = textwrap.dedent(
    """
    import sys
    from ptum.stages import multinode
    rank_script, out, node, endpoint, *fail = sys.argv[1:]
    multinode.run_nodes(
        [rank_script, out, node, *fail],
        nnodes=2, node_rank=int(node), endpoint=endpoint, nproc=1, run_id="test",
    )
    """
)
RANK = textwrap.dedent(
    """
    import json, os, sys, time
    import torch, torch.distributed as dist
    out, node, *fail = sys.argv[1:]
    if fail == ["orphan"]:  # as `ptum pretrain` does in a rank: die with the agent
        from ptum.stages import multinode
        multinode.die_with_agent()
        open(os.path.join(out, "pid" + node), "w").write(str(os.getpid()))
        time.sleep(300)
    dist.init_process_group("gloo")
    if fail and node == "1":
        sys.exit(3)  # rank 0 is left waiting in the all-reduce below
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    names = ("RANK", "GROUP_RANK", "MASTER_ADDR", "GLOO_SOCKET_IFNAME", "OMP_NUM_THREADS")
    seen = {k: os.environ[k] for k in names} | {"node": node, "sum": t.item()}
    open(os.path.join(out, "node" + node), "w").write(json.dumps(seen))
    time.sleep(3)  # the test reads the socket table meanwhile
    dist.barrier()
    dist.destroy_process_group()
    """
)


def _start_nodes(tmp_path: Path, *extra: str) -> list[subprocess.Popen]:
    """Two `run_nodes`, node 1 first: it is older (a lower PID), which torch would rank 0."""
    (tmp_path / "node.py").write_text(NODE)
    (tmp_path / "rank.py").write_text(RANK)
    endpoint = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("GLOO_SOCKET_IFNAME", None)
    return [
        subprocess.Popen(
            [sys.executable, str(tmp_path / "node.py"), str(tmp_path / "rank.py"), str(tmp_path)]
            + [str(node), endpoint, *extra],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (1, 0)
    ]


@pytest.mark.slow
@pytest.mark.skipif(not LINUX, reason="reads /proc/net/tcp")
def test_two_nodes_meet_in_node_rank_order_on_loopback_only(tmp_path):
    procs = _start_nodes(tmp_path)
    listening: set[tuple[str, int]] = set()
    while any(p.poll() is None for p in procs):
        if (tmp_path / "node0").exists() and (tmp_path / "node1").exists():
            pids = {p.pid for p in procs}
            listening |= _listening(pids | {c for pid in pids for c in _children(pid)})
        time.sleep(0.2)
    for p in procs:
        assert p.returncode == 0, p.stdout.read() if p.stdout else ""
    seen = {n: json.loads((tmp_path / f"node{n}").read_text()) for n in (0, 1)}
    assert seen[0]["sum"] == 3.0  # 1 + 2: the group really reduced
    # Global ranks follow --node-rank, whatever order the machines started in.
    assert [(seen[n]["RANK"], seen[n]["GROUP_RANK"]) for n in (0, 1)] == [("0", "0"), ("1", "1")]
    assert {seen[n]["MASTER_ADDR"] for n in (0, 1)} == {"127.0.0.1"}  # node 0's own store
    assert seen[1]["GLOO_SOCKET_IFNAME"] == launch.loopback_interface()
    assert listening and {a for a, _ in listening} == {"127.0.0.1"}, listening


@pytest.mark.slow
def test_a_failing_rank_ends_every_node(tmp_path):
    procs = _start_nodes(tmp_path, "fail")
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert procs[0].returncode != 0 and "CalledProcessError" in outs[0], outs[0]
    assert "(rank 1, on node 1 of 2)" in outs[0]
    assert procs[1].returncode != 0, outs[1]  # node 0: its rank lost its peer


@pytest.mark.slow
def test_a_machine_alone_gives_up_after_the_join_timeout(monkeypatch):
    monkeypatch.setattr(multinode, "JOIN_TIMEOUT_S", 2)
    monkeypatch.setenv("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGTERM")  # torch sets it: restored
    endpoint = f"127.0.0.1:{_free_port()}"
    run = dict(nnodes=2, endpoint=endpoint, nproc=1, run_id="alone")
    with pytest.raises(multinode.RendezvousFailed, match="not all 2 machines joined within 2s"):
        multinode.run_nodes(["-c", "pass"], node_rank=0, **run)
    with pytest.raises(ValueError, match="no rendezvous there.*start node 0"):
        multinode.run_nodes(["-c", "pass"], node_rank=1, **run)


@pytest.mark.slow
@pytest.mark.skipif(not LINUX, reason="a parent-death signal")
def test_ranks_die_with_their_machines_ptum(tmp_path):
    """torch's agent starts ranks in sessions of their own: without `die_with_agent` a killed
    `ptum` would leave them training (a rank 0 writing outside any lock)."""
    procs = _start_nodes(tmp_path, "orphan")
    try:
        pids = [tmp_path / "pid1", tmp_path / "pid0"]
        deadline = time.monotonic() + 120
        while not all(p.exists() and p.read_text() for p in pids):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.1)
        for proc, pid in zip(procs, pids, strict=True):
            proc.kill()  # SIGKILL: nothing of the agent runs
            assert gone_within(int(pid.read_text()), 30)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
