"""Fault-injection shim, imported by Python at start-up when this directory is on PYTHONPATH.

It wraps the standard library's file operations (open for writing, os.replace, os.rename,
os.fsync, os.link, os.unlink, os.rmdir, os.mkdir) and counts those that touch a path under the
working directory (the throw-away project). Armed by the environment of the `ptum` process the
test starts (never of its children, which are not counted):

    PTUM_FAULT_ARM=1        count in this process
    PTUM_FAULT_LOG=FILE     append one line per event: "INDEX<TAB>OP<TAB>PATH"
    PTUM_FAULT_KILL_AT=N    SIGKILL this process just before event N (1-based) takes effect

Only the standard library is touched, so the suite does not depend on ptum's internals.
"""

from __future__ import annotations

import builtins
import io
import os
import signal

_ARMED = os.environ.pop("PTUM_FAULT_ARM", "") == "1"  # popped: children are not armed


def _install() -> None:
    root = os.path.realpath(os.getcwd())
    kill_at = int(os.environ.pop("PTUM_FAULT_KILL_AT", "0") or 0)
    log_path = os.environ.pop("PTUM_FAULT_LOG", "")
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND) if log_path else None
    count = [0]
    real_readlink = os.readlink

    def where(target: object) -> str | None:
        if isinstance(target, int):  # a file descriptor (fsync)
            try:
                return real_readlink(f"/proc/self/fd/{target}")
            except OSError:
                return None
        try:
            return os.path.realpath(os.fspath(target))  # type: ignore[arg-type]
        except TypeError:
            return None

    def event(op: str, target: object) -> None:
        path = where(target)
        if path is None or not (path == root or path.startswith(root + os.sep)):
            return
        count[0] += 1
        if log_fd is not None:
            os.write(log_fd, f"{count[0]}\t{op}\t{os.path.relpath(path, root)}\n".encode())
        if count[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(module: object, name: str) -> None:
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            if args:
                dir_fd = kwargs.get("dir_fd") or kwargs.get("src_dir_fd")
                target = args[0]
                if dir_fd is not None:  # shutil.rmtree: a name relative to an open directory
                    target = os.path.join(where(dir_fd) or "", os.fspath(target))
                event(name, target)
            return real(*args, **kwargs)

        setattr(module, name, wrapper)

    for name in ("replace", "rename", "fsync", "link", "unlink", "remove", "rmdir", "mkdir"):
        wrap(os, name)

    real_open = builtins.open

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(mode, str) and any(c in mode for c in "wax+"):
            event("open:" + mode, file)
        return real_open(file, mode, *args, **kwargs)

    builtins.open = open_
    io.open = open_


if _ARMED:
    _install()
