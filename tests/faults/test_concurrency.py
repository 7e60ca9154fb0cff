"""Two writers on one output, and stage processes whose starter dies.

A second `ptum` run on an output another run is writing refuses at once (one line naming the
holder's PID, exit code 2) and the first ends as if it had run alone. A stage dies with the
process that started it — `dvc repro` killed by SIGKILL, through whichever shell DVC puts in
between — unless it was started with nohup; the lock of a killed holder blocks no rerun.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from ptum import locks
from tests.faults.harness import (
    CKPT,
    PRETRAIN,
    ROOT,
    Run,
    assert_pretrain_equal,
    copy_project,
    error_line,
    ptum,
    rerun,
)
from tests.test_locks import gone_within

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; PDEATHSIG"),
]

LOCK = CKPT.parent / f".{CKPT.name}.lock"  # models/pretrain/.hsa.lock


def wait_for(path: Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def holder(proj: Path) -> int:
    """The PID in the output's lock file, once the holder has written it."""
    wait_for(proj / LOCK)
    for _ in range(100):
        text = (proj / LOCK).read_text().strip()
        if text:
            return int(text)
        time.sleep(0.02)
    raise AssertionError("the lock file names no PID")


def in_background(proj: Path, *args: str) -> tuple[threading.Thread, list[Run]]:
    """`ptum ARGS` in `proj`, run by a thread; its Run lands in the list."""
    runs: list[Run] = []
    thread = threading.Thread(target=lambda: runs.append(ptum(proj, *args)))
    thread.start()
    return thread, runs


def test_a_second_writer_is_refused_at_once_and_the_first_ends_as_a_solo_run(
    base, pretrained, tmp_path
):
    proj = copy_project(base.proj, tmp_path / "proj")
    thread, first = in_background(proj, *PRETRAIN)
    pid = holder(proj)
    os.kill(pid, signal.SIGSTOP)  # the first stays mid-run, whatever the machine's speed
    try:
        second = ptum(proj, *PRETRAIN)
    finally:
        os.kill(pid, signal.SIGCONT)
    thread.join()
    line = error_line(second, "pretrain")
    assert line == (
        f"ptum pretrain: error: {CKPT}: another ptum process (PID {pid}) is writing it; "
        f"wait for it to finish or stop it (kill {pid}), then rerun"
    )
    assert second.seconds < 60  # refused, not queued behind the first
    assert first[0].rc == 0, first[0].explain()
    assert_pretrain_equal(proj, pretrained.proj)  # bit-identical to an uninterrupted solo run
    assert not (proj / LOCK).exists()


def test_the_lock_of_a_writer_killed_by_sigkill_blocks_no_rerun(base, pretrained, tmp_path):
    proj = copy_project(base.proj, tmp_path / "proj")
    thread, first = in_background(proj, *PRETRAIN)
    os.kill(holder(proj), signal.SIGKILL)
    thread.join()
    assert first[0].rc == -signal.SIGKILL
    assert (proj / LOCK).exists()  # left behind, but the kernel released the lock
    rerun(proj, *PRETRAIN)
    assert_pretrain_equal(proj, pretrained.proj)


# --- a stage dies with its starter ----------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DVC_NO_ANALYTICS="1")
    env.pop("PTUM_DEBUG", None)
    return env | extra


# bash execs a lone command (the stage's parent is DVC); dash, Debian's /bin/sh, stays between.
@pytest.mark.parametrize("shell", ["/bin/bash", "/bin/sh"])
def test_killing_dvc_repro_stops_its_stage_and_frees_the_output(shell, base, tmp_path):
    if not Path(shell).exists():
        pytest.skip(f"no {shell}")
    proj = copy_project(base.proj, tmp_path / "proj")
    cmd = shlex.join([sys.executable, "-m", "ptum", *PRETRAIN, "--set", "pretrain.epochs=30"])
    (proj / "dvc.yaml").write_text(f"stages:\n  pretrain:\n    cmd: {cmd}\n")
    env = _env(SHELL=shell)
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=proj, env=env, check=True)
    p = subprocess.Popen(
        [*dvc, "repro"], cwd=proj, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        wait_for(proj / CKPT / "LATEST")  # an epoch is done: the stage is training
        pid = holder(proj)
    finally:
        p.kill()  # SIGKILL: DVC can pass nothing on
    # The stage shares DVC's output pipe: it is closed once the stage (and any shell) ended.
    out = p.communicate(timeout=60)[0].decode(errors="replace")
    assert gone_within(pid, 10), f"ptum {pid} outlived dvc repro"
    assert "ptum pretrain: interrupted by signal 15; checkpoint saved" in out, out[-3000:]
    lock = locks.acquire(proj / CKPT)  # free
    locks.release(*lock)
    # The user's immediate `dvc repro` resumes the checkpoint and completes.
    again = subprocess.run([*dvc, "repro"], cwd=proj, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "ptum pretrain: done" in again.stderr + again.stdout


# A parent that starts a command (argv[2:]), waits until the file argv[1] exists (the lock file:
# ptum has armed its parent-death signal by the time it takes its lock), and exits.
PARENT = textwrap.dedent(
    """
    import subprocess, sys, time
    from pathlib import Path
    log = open("ptum.log", "w")
    child = subprocess.Popen(sys.argv[2:], stdout=log, stderr=log)
    print(child.pid, flush=True)
    while not Path(sys.argv[1]).exists() and child.poll() is None:
        time.sleep(0.02)
    print("running" if child.poll() is None else "ended", flush=True)
    """
)


@pytest.mark.parametrize("nohup", [False, True], ids=["plain", "nohup"])
def test_a_stage_dies_with_its_parent_unless_started_with_nohup(nohup, base, pretrained, tmp_path):
    if nohup and shutil.which("nohup") is None:
        pytest.skip("no nohup")
    proj = copy_project(base.proj, tmp_path / "proj")
    cmd = [*(["nohup"] if nohup else []), sys.executable, "-m", "ptum", *PRETRAIN]
    parent = subprocess.run(
        [sys.executable, "-c", PARENT, str(LOCK), *cmd],
        cwd=proj,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    first, state = parent.stdout.split()
    pid = int(first)
    assert state == "running", (proj / "ptum.log").read_text()  # when its parent exited
    if not nohup:
        assert gone_within(pid, 10), f"ptum {pid} outlived its parent"
        return
    assert gone_within(pid, 300), f"ptum {pid} did not finish"
    assert "ptum pretrain: done" in (proj / "ptum.log").read_text()
    assert_pretrain_equal(proj, pretrained.proj)
