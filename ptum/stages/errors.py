"""How a failed stage is reported: the CLI's one error policy.

An anticipated failure (bad configuration or data, a missing, damaged or foreign input file,
a full disk, a permission) ends `ptum STAGE` with one line, `ptum STAGE: error: ...`, naming
the file and the fix, and exit code 2. Anything else is a bug: its traceback is kept and a last
line says so (exit code 1). `PTUM_DEBUG=1` shows the traceback of anticipated failures too.

Library errors that cannot name the file (polars, safetensors and onnxruntime read files in
native code; `json.loads` sees text) are named two ways: stage modules wrap their library calls
in `reading(inputs...)`, which names the stage's inputs and the stages that write them, and the
CLI records the last `.json` file opened (an audit hook) so that invalid JSON names its file.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ptum import paths

# Error classes from native readers, matched by module and name so that this module imports
# none of them (the CLI must start without importing polars, torch or onnxruntime).
POLARS_INPUT_ERRORS = {"ComputeError", "SchemaError", "ColumnNotFoundError", "NoDataError"}
GLOO_PEER_LOST = re.compile(
    r"gloo/transport/\S*\] (.*?Connection (?:closed|reset) by peer(?: \[[^\]]*\]:\d+)?)"
)
REPORT_TO = "this is a bug in ptum, not in your input: please report it with the traceback above"


class StageError(Exception):
    """An anticipated failure whose message already names the file(s) and the fix."""


def _native_kind(exc: BaseException) -> str | None:
    """'polars ComputeError', 'safetensors SafetensorError', 'onnxruntime NoSuchFile',
    'pyo3_runtime PanicException' (a native reader's panic: polars on a damaged Parquet file;
    it derives from BaseException, not Exception), or None."""
    for cls in type(exc).__mro__:
        module = cls.__module__ or ""
        if cls.__name__ == "PanicException":
            return f"{module.split('.')[0]} PanicException"
        if module.startswith("polars") and cls.__name__ in POLARS_INPUT_ERRORS:
            return f"polars {cls.__name__}"
        if module.startswith("safetensors"):
            return f"safetensors {cls.__name__}"
        if module.startswith("onnxruntime"):
            return f"onnxruntime {cls.__name__}"
    return None


def _how_it_ended(returncode: int) -> str:
    """'was killed by SIGKILL' or 'exited with status 1 (its error is above)'."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode} (its error is above)"


def _from_distributed(exc: BaseException) -> bool:
    """A collective that failed because a peer went away: torch's Dist*Error, or the plain
    RuntimeError of gloo's transport, raised inside torch.distributed or inside backward (DDP's
    gradient all-reduce): 'Connection closed by peer', 'Connection reset by peer'."""
    if type(exc).__name__ in {"DistBackendError", "DistNetworkError"}:
        return True
    if not isinstance(exc, RuntimeError):
        return False
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = tb.tb_frame.f_code.co_filename.replace(os.sep, "/") if tb is not None else ""
    return "/torch/distributed/" in where or GLOO_PEER_LOST.search(str(exc)) is not None


def _peer_reason(exc: BaseException) -> str:
    """gloo's own words without its source path and advice ('Read error [127.0.0.1]:2249:
    Connection reset by peer'), else the error's first line."""
    m = GLOO_PEER_LOST.search(str(exc))
    return f"gloo: {m.group(1)}" if m else _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def rebuild_hint(files: list[Path]) -> str:
    """'rerun `dvc repro prepare` (or `ptum prepare`)' for pipeline files; else a generic fix."""
    stages = list(dict.fromkeys(s for s in map(paths.producer, files) if s))
    if not stages:
        return "check that the file is the right one and complete, or recreate it"
    runs = " and ".join(f"`ptum {s}`" for s in stages)
    return f"rebuild it: `dvc repro` (or {runs}); `dvc checkout` restores a cached copy"


@contextmanager
def reading(*inputs: Path, writing: Path | None = None) -> Iterator[None]:
    """Turn an error from reading a damaged or foreign input (polars, safetensors, onnxruntime,
    a native reader's panic, invalid JSON) raised inside the block into a StageError naming
    `inputs` and the fix; a full disk while writing is named as such (`writing`: the output,
    when the error has no file name)."""
    try:
        yield
    except json.JSONDecodeError as exc:
        files = [LAST_JSON[0]] if LAST_JSON else list(inputs)
        raise StageError(_json_message(exc, files)) from exc
    except BaseException as exc:  # a PanicException is not an Exception
        kind = _native_kind(exc)
        if kind is None:
            raise
        # A failed *write* inside the block (polars reports "... (os error 28): PATH") is not
        # a damaged input: say what it is.
        found = re.search(r"\(os error (\d+)\)(?:: (.+))?", str(exc))
        if found and int(found.group(1)) in DISK_FULL:
            n = int(found.group(1))
            name = found.group(2) or (str(writing) if writing is not None else None)
            raise StageError(_os_message(OSError(n, os.strerror(n), name))) from exc
        where = ", ".join(str(p) for p in inputs) or "the stage's inputs"
        raise StageError(
            f"{kind} while reading {where}: {_first_line(exc)}; the input is damaged or does "
            f"not have what this stage needs: {rebuild_hint(list(inputs))}"
        ) from exc


# --- the file behind invalid JSON -------------------------------------------------------------

LAST_JSON: list[Path] = []  # the last .json file opened in this process


def _audit(event: str, args: tuple) -> None:
    if event == "open" and isinstance(args[0], str | os.PathLike):
        name = os.fspath(args[0])
        if isinstance(name, str) and name.endswith(".json"):
            LAST_JSON[:] = [Path(name)]


_TRACKING: list[bool] = []


def track_json_reads() -> None:
    """Remember the last .json file opened (once per process; audit hooks cannot be removed)."""
    if not _TRACKING:
        sys.addaudithook(_audit)
        _TRACKING.append(True)


def _json_message(exc: json.JSONDecodeError, files: list[Path]) -> str:
    where = ", ".join(str(f) for f in files) or "a JSON file"
    return (
        f"{where}: invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); the file "
        f"is damaged or was cut short: {rebuild_hint(files)}"
    )


# --- the policy -------------------------------------------------------------------------------


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _os_message(exc: OSError) -> str:
    # polars puts the path in the message only: "No such file or directory (os error 2): PATH"
    found = re.search(r"\(os error \d+\): (.+)$", str(exc))
    filename = exc.filename or (found.group(1).strip() if found else None)
    name = filename or "a file"
    if exc.errno in DISK_FULL:
        return (
            f"{name}: cannot write ({exc.strerror}): the device is full, a quota is exceeded or "
            "a file size limit (ulimit -f) is reached; free some space (`dvc gc` drops unused "
            "cache entries) or raise the limit and rerun: the stage resumes from what it saved "
            "completely (its last checkpoint, its finished grid cells) or starts over, and never "
            "reads a half-written file"
        )
    if isinstance(exc, PermissionError) or exc.errno == errno.EROFS:
        return (
            f"{name}: permission denied ({exc.strerror}); make it writable/readable for this "
            "user (ls -l, chmod) or choose another path with --out/--input"
        )
    if isinstance(exc, FileNotFoundError) and filename:
        if paths.producer(filename):
            return f"{name}: no such file; {rebuild_hint([Path(filename)])}"
        return f"{name}: no such file; check the path (--input, --params, data.path)"
    if exc.filename:
        return f"{name}: {exc.strerror or _first_line(exc)}; check the disk and the path"
    return _first_line(exc)


def explain(exc: BaseException) -> str | None:
    """The one line for an anticipated failure, or None for an unexpected one (a bug)."""
    if isinstance(exc, StageError):
        return str(exc)
    if isinstance(exc, json.JSONDecodeError):
        return _json_message(exc, list(LAST_JSON))
    if isinstance(exc, OSError):
        return _os_message(exc)
    if isinstance(exc, subprocess.CalledProcessError):
        return f"a process of this stage {_how_it_ended(exc.returncode)}: {' '.join(map(str, exc.cmd))}"
    if _from_distributed(exc):
        return (
            f"lost a peer of this data-parallel run ({_peer_reason(exc)}); another process or "
            "machine of the run stopped: rerun it (on every machine) to resume from the last "
            "checkpoint"
        )
    kind = _native_kind(exc)
    if kind is not None:
        return (
            f"{kind}: {_first_line(exc)}; an input file is damaged or does not have what this "
            "stage needs: rerun the stages before it (`dvc repro`)"
        )
    # ConfigError, DataError, HashMismatch, CheckpointMismatch, ... say what and where.
    if isinstance(exc, ValueError):
        return str(exc).strip()
    return None
