"""One writer per output: an exclusive lock on each output of a stage run, and stage processes
that die with the process that started them (an orphan would go on writing beside the rerun
its user starts).

    with holding([Path("models/pretrain/hsa")]):   # OutputLocked at once if another run holds it
        ...

The lock of an output is `fcntl.flock` on a hidden file beside it, `.<name>.lock` in its parent
directory: not inside the output (DVC would hash it into a tracked directory, and
`ptum.io.atomic_dir` swaps an output directory as a whole). The file holds the holder's PID for
the refusal message. The kernel releases a flock when its holder dies, even by SIGKILL, so a
killed run never blocks the next one; the file itself is removed on release (.gitignore and
.dvcignore cover one a SIGKILL leaves behind).

A process holding locks lists them in PTUM_HELD_LOCKS for the `ptum` processes it starts:
the data-parallel ranks of `ptum pretrain --nproc N` run under their launcher's lock.

`stop_with_parent` (Linux) makes this process get SIGTERM when its parent dies, `dvc repro`
killed by SIGKILL included (and, when DVC ran the stage through a shell that stays in between,
when DVC dies); `die_with_parent` arms the same signal in a child (as its `preexec_fn`).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

HELD_ENV = "PTUM_HELD_LOCKS"
PR_SET_PDEATHSIG = 1
# DVC runs a stage's command as `$SHELL -c CMD` (/bin/sh without SHELL). bash execs a single
# command, so the stage's parent is DVC; dash (Debian's /bin/sh) stays between the two, and
# outlives a DVC killed by SIGKILL.
SHELLS = frozenset({"sh", "dash", "bash", "zsh", "ksh", "mksh", "fish", "busybox"})
WATCH_S = 0.5  # how often a stage run under such a shell checks that DVC is still there


class OutputLocked(ValueError):
    """Another process holds the lock of an output. A ValueError: the CLI's error policy
    (`ptum.stages.errors.explain`) prints its message as the one-line error, exit code 2."""


def lock_path(output: Path) -> Path:
    """The lock file of `output`: `.<name>.lock` in its parent directory."""
    path = Path(os.path.abspath(output))  # "x/.", "x/" and "./x" are one output
    return path.parent.resolve() / f".{path.name}.lock"


def _held() -> list[str]:
    return [p for p in os.environ.get(HELD_ENV, "").split(os.pathsep) if p]


def _holder(fd: int) -> str:
    """The PID a lock file records (the holder writes it just after taking the lock)."""
    for _ in range(20):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text:
            return text
        time.sleep(0.01)
    return "unknown"


def acquire(output: Path) -> tuple[Path, int]:
    """Take the lock of `output` without waiting; returns the lock file and its descriptor
    (give both to `release`). OutputLocked names the output and the holder's PID."""
    path = lock_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder(fd)
            os.close(fd)
            raise OutputLocked(
                f"{output}: another ptum process (PID {pid}) is writing it; wait for it to "
                f"finish or stop it (kill {pid}), then rerun"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        # The file may have been removed by the previous holder between our open and flock: a
        # lock on a file no longer at `path` excludes no one, so start again.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            with contextlib.suppress(OSError):  # a full disk: locked all the same, PID unsaid
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return path, fd
        os.close(fd)


def release(lock: Path, fd: int) -> None:
    """Remove the lock file (while still holding it, and if it is still ours), then release
    the lock."""
    with contextlib.suppress(FileNotFoundError):
        if os.path.samestat(os.fstat(fd), os.stat(lock)):
            os.unlink(lock)
    os.close(fd)


@contextmanager
def holding(outputs: Iterable[Path]) -> Iterator[None]:
    """Hold the lock of every output for the block (those an ancestor process holds for this
    one, PTUM_HELD_LOCKS, excepted); OutputLocked, at once, if another process holds one."""
    held, taken = _held(), []
    before = os.environ.get(HELD_ENV)
    try:
        wanted = {str(lock_path(o)): Path(o) for o in outputs}  # one lock per output
        for lock, output in wanted.items():
            if lock not in held:
                taken.append(acquire(output))
        os.environ[HELD_ENV] = os.pathsep.join([*held, *(str(path) for path, _ in taken)])
        yield
    finally:
        for path, fd in reversed(taken):
            release(path, fd)
        if before is None:
            os.environ.pop(HELD_ENV, None)
        else:
            os.environ[HELD_ENV] = before


# --- dying with the parent -----------------------------------------------------------------


# Loaded here, not in a preexec_fn: a child should not load libraries between fork and exec.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Linux: this process gets `signum` when its parent dies (even by SIGKILL); elsewhere a
    no-op. Pass it as `preexec_fn` to make a child die with this process — strictly, with the
    thread that started it: start it from a thread that waits for it."""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signum)


def _stat(pid: int) -> tuple[str, int] | None:
    """(command name, parent PID) of process `pid` from /proc, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :]
    return name, int(rest.split()[1])  # fields after the name: state, ppid, ...


def _watch_grandparent(shell: int, grandparent: int) -> None:
    """Thread: SIGTERM this process once `shell` no longer has `grandparent` as its parent
    (the grandparent died and the shell, waiting for us, was re-parented)."""
    while (_stat(shell) or ("", -1))[1] == grandparent:
        time.sleep(WATCH_S)
    os.kill(os.getpid(), signal.SIGTERM)


def stop_with_parent(started_by: int) -> bool:
    """Linux: end this process (SIGTERM) when the process that started it dies, so that
    killing `dvc repro`, `dvc exp run` or the flow that ran it stops the stage; `started_by`:
    the parent PID seen when this process started. Returns whether it was armed.

    Not armed when SIGHUP is ignored (`nohup ptum ...`) or this process leads its own session
    (`setsid ptum ...`): both ask for a process that outlives whoever started it. When the
    parent is already gone (it died before the signal was armed) this process stops now.
    When DVC started this process through a shell that stays in between, DVC is watched too.
    """
    if not sys.platform.startswith("linux"):
        return False
    if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN or os.getsid(0) == os.getpid():
        return False
    die_with_parent()
    if os.getppid() != started_by:
        os.kill(os.getpid(), signal.SIGTERM)
        return True
    parent = _stat(started_by)
    if "DVC_STAGE" in os.environ and parent is not None and parent[0] in SHELLS:
        args = (started_by, parent[1])
        threading.Thread(target=_watch_grandparent, args=args, daemon=True).start()
    return True
