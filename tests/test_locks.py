"""ptum.locks: one writer per output (flock beside the output), and processes that die with
their parent."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ptum import locks

ROOT = Path(__file__).resolve().parents[1]
LINUX = sys.platform.startswith("linux")
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_the_lock_file_is_hidden_beside_the_output_not_in_it(tmp_path):
    out = tmp_path / "models" / "hsa"
    assert locks.lock_path(out) == tmp_path / "models" / ".hsa.lock"
    # Spellings of one output share one lock.
    assert locks.lock_path(tmp_path / "models" / "hsa" / ".") == locks.lock_path(out)
    assert locks.lock_path(Path(f"{out}/")) == locks.lock_path(out)
    assert locks.lock_path(Path("x.parquet")) == Path.cwd() / ".x.parquet.lock"


def test_a_second_writer_is_refused_at_once_with_the_holders_pid(tmp_path):
    out = tmp_path / "models" / "hsa"
    lock, fd = locks.acquire(out)  # creates the parent directory
    assert lock.read_text() == f"{os.getpid()}\n"
    t0 = time.monotonic()
    with pytest.raises(locks.OutputLocked) as e:
        locks.acquire(out)  # another open file: conflicts even within one process
    assert time.monotonic() - t0 < 5  # refused, not waiting
    message = str(e.value)
    assert message.startswith(f"{out}: ") and f"(PID {os.getpid()})" in message
    assert "\n" not in message and isinstance(e.value, ValueError)
    locks.release(lock, fd)
    assert not lock.exists()
    lock, fd = locks.acquire(out)  # free again
    locks.release(lock, fd)


def test_holding_takes_every_output_and_tells_child_processes(tmp_path, monkeypatch):
    monkeypatch.delenv(locks.HELD_ENV, raising=False)
    a, b = tmp_path / "a", tmp_path / "b.json"
    with locks.holding([a, b, tmp_path / "a" / "."]):
        held = os.environ[locks.HELD_ENV].split(os.pathsep)
        assert held == [str(tmp_path / ".a.lock"), str(tmp_path / ".b.json.lock")]
        with pytest.raises(locks.OutputLocked):
            locks.acquire(b)
        # A process started by the holder (a data-parallel rank) runs under its locks.
        with locks.holding([a]):
            pass
    assert locks.HELD_ENV not in os.environ
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # lock files removed
    with locks.holding([a]):  # released
        pass


def test_a_refused_holding_releases_what_it_took(tmp_path):
    lock, fd = locks.acquire(tmp_path / "b")
    with pytest.raises(locks.OutputLocked):
        with locks.holding([tmp_path / "a", tmp_path / "b"]):
            pytest.fail("ran without the lock")
    locks.release(lock, fd)
    with locks.holding([tmp_path / "a"]):
        pass


def test_a_lock_file_removed_between_open_and_flock_is_not_trusted(tmp_path, monkeypatch):
    """The holder releases (removing the file) just after we opened it: our flock succeeds on
    a file no longer at the path, which excludes no one; acquire starts again on a new file."""
    out = tmp_path / "o"
    first = locks.acquire(out)
    real, calls = fcntl.flock, []

    def flock(fd: int, op: int) -> None:
        if not calls:
            locks.release(*first)
        calls.append(fd)
        real(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    lock, fd = locks.acquire(out)
    assert len(calls) == 2
    assert os.path.samestat(os.fstat(fd), os.stat(lock))
    monkeypatch.undo()
    with pytest.raises(locks.OutputLocked):
        locks.acquire(out)
    locks.release(lock, fd)


HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from ptum import locks
    locks.acquire(Path(sys.argv[1]))
    print("held", flush=True)
    time.sleep(60)
    """
)


def test_the_lock_is_released_when_its_holder_is_killed(tmp_path):
    out = tmp_path / "out"
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], env=ENV, stdout=subprocess.PIPE, text=True
    )
    try:
        assert p.stdout is not None and p.stdout.readline() == "held\n"
        with pytest.raises(locks.OutputLocked, match=f"PID {p.pid}"):
            locks.acquire(out)
    finally:
        p.kill()
        p.wait()
    assert locks.lock_path(out).exists()  # left by the kill, but not locked
    lock, fd = locks.acquire(out)
    assert lock.read_text() == f"{os.getpid()}\n"
    locks.release(lock, fd)


# --- dying with the parent ----------------------------------------------------------------

ARM = "import os, time; from ptum import locks; print(locks.stop_with_parent({}), flush=True)"


def _armed(started_by: str, **popen) -> subprocess.CompletedProcess:
    code = ARM.format(started_by)
    return subprocess.run(
        [sys.executable, "-c", code], env=ENV, capture_output=True, text=True, **popen
    )


@pytest.mark.skipif(not LINUX, reason="PR_SET_PDEATHSIG is Linux's")
def test_stop_with_parent_is_armed_except_under_nohup_or_setsid():
    assert _armed("os.getppid()").stdout == "True\n"
    nohup = _armed("os.getppid()", preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    assert nohup.stdout == "False\n"
    assert _armed("os.getppid()", start_new_session=True).stdout == "False\n"


@pytest.mark.skipif(not LINUX, reason="PR_SET_PDEATHSIG is Linux's")
def test_a_parent_gone_before_the_signal_was_armed_stops_the_process_at_once():
    # The PID seen at start is not the parent now: it was re-parented, its parent is gone.
    run = _armed("os.getppid() + 1")
    assert run.returncode == -signal.SIGTERM, run


# The middle process starts CHILD as `preexec_fn=die_with_parent` (flows, launch) or through a
# shell that stays in between, like DVC's `$SHELL -c CMD` when the shell does not exec.
MIDDLE = textwrap.dedent(
    """
    import os, shlex, subprocess, sys, time
    from ptum import locks
    child = [sys.executable, "-c", sys.argv[2]]
    if sys.argv[1] == "preexec":
        p = subprocess.Popen(child, preexec_fn=locks.die_with_parent)
    else:  # the child arms itself; `; :` keeps any shell from exec-ing it in its place
        cmd = shlex.join([*child, "arm"]) + "; :"
        p = subprocess.Popen(["/bin/sh", "-c", cmd], env=dict(os.environ, DVC_STAGE="s"))
    time.sleep(60)
    """
)
CHILD = textwrap.dedent(
    """
    import os, sys, time
    from ptum import locks
    if sys.argv[1:] == ["arm"]:
        locks.stop_with_parent(os.getppid())
    print(os.getpid(), flush=True)
    time.sleep(60)
    """
)


@pytest.mark.skipif(not LINUX, reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("how", ["preexec", "dvc-shell"])
def test_a_child_dies_when_its_starter_is_killed(how):
    middle = subprocess.Popen(
        [sys.executable, "-c", MIDDLE, how, CHILD], env=ENV, stdout=subprocess.PIPE, text=True
    )
    try:
        assert middle.stdout is not None
        child = int(middle.stdout.readline())
        assert alive(child)  # and armed: it printed its PID after arming
    finally:
        middle.kill()
        middle.wait()
    assert gone_within(child, 10), f"child {child} outlived its starter"
