"""Atomic, durable writes: a reader (or a rerun after a kill or a full disk) sees the previous
file or the new one, never a torn one.

A file is written to a temp file in the same directory (a rename is atomic only within one
file system), flushed and fsynced, renamed over the target with `os.replace`, and the directory
is fsynced so the rename itself survives a power loss. A directory output is built in a staging
directory `<name>.tmp` beside it and swapped in the same way once every file of it is written.

    atomic_write_json(path, report, indent=2, sort_keys=True)   # json.dumps(...) + "\\n"
    with atomic_path(path) as tmp:                              # writers that want a path
        df.write_parquet(tmp)
    with atomic_dir(out_dir, marker="manifest.json", stage="tokenize") as tmp:  # a whole directory
        (tmp / "a.npy").write_bytes(...)

Temp files are named `.<name>.<random>.tmp` (hidden, unique: two processes may write the same
file at once, the last rename wins) and removed when the write fails; only a killed process
leaves one behind (`temp_target` recognises them). The staging directory of `atomic_dir` has a
fixed name, so a rerun clears what a killed run left; one directory output has one writer.
`atomic_dir` replaces only what its writer wrote before (a `marker` file of that stage) or an
empty directory: a `--out` pointed at a directory of the user's own files is refused, never
emptied.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TEMP_SUFFIX = ".tmp"


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes the renames in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes) -> None:
    """Write `path` and fsync it, without a rename: for files inside a staging directory that
    is renamed as a whole (the caller fsyncs the directories)."""
    try:
        with Path(path).open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise _named(exc, path) from exc


def _named(exc: OSError, path: Path) -> OSError:
    """`exc` with `path` as its filename when it has none (a failed write() — disk full, file
    size limit — names no file), so the CLI's one-line error can say which file."""
    if exc.filename is not None:
        return exc
    return type(exc)(exc.errno, exc.strerror or str(exc), str(path))


def temp_target(name: str) -> str | None:
    """The name of the file a temp file named `name` was written for, or None when `name` is not
    one of this module's temp files (e.g. ".LATEST.3f9a0c1d.tmp" -> "LATEST")."""
    if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
        return None
    target, sep, _token = name[1 : -len(TEMP_SUFFIX)].rpartition(".")
    return target if sep and target else None


def _create_temp(path: Path) -> Path:
    """Create an empty, unique temp file beside `path` (permissions as for any new file)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path` for a writer that takes a path (`df.write_parquet`);
    when the block ends normally the temp file is fsynced and replaces `path` atomically; when
    it raises, the temp file is removed and `path` is left as it was.

    The temp name ends in ".tmp": give writers that append their own suffix to a path without
    one (`np.save`) an open file instead.
    """
    with _replacing(Path(path), synced=False) as tmp:
        yield tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` by `data` atomically and durably (see the module docstring)."""
    try:
        with _replacing(Path(path), synced=True) as tmp:
            write_durable(tmp, data)
    except OSError as exc:
        if exc.filename is not None and Path(exc.filename).name.endswith(TEMP_SUFFIX):
            raise type(exc)(exc.errno, exc.strerror, str(path)) from exc  # the target, not the temp
        raise


@contextmanager
def _replacing(path: Path, *, synced: bool) -> Iterator[Path]:
    """The temp file of one atomic write; `synced`: the block fsyncs it itself."""
    tmp = _create_temp(path)
    try:
        yield tmp
        if not synced:
            fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write_text(path: Path, text: str, encoding: str = "utf-8") -> None:
    """Replace `path` by `text` (encoded, newlines untranslated) atomically and durably."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: Path, obj: Any, **dumps_kwargs: Any) -> None:
    """Replace `path` by `json.dumps(obj, **dumps_kwargs)` and a final newline, atomically.

    The keyword arguments are json.dumps's (indent, sort_keys, allow_nan, ...): each output
    keeps the formatting its readers and DVC's hashes expect.
    """
    atomic_write_text(path, json.dumps(obj, **dumps_kwargs) + "\n")


class NotAnOutput(ValueError):
    """A directory that atomic_dir would replace holds files its writer did not write."""


def check_replaceable(path: Path, marker: str, stage: str | None = None) -> None:
    """Raise NotAnOutput unless `path` is missing, empty (DVC's .gitignore aside) or an earlier
    output of the same writer: it holds the file `marker` and, when that is a JSON object, its
    "stage" is `stage` (a data manifest written by another stage does not count; a damaged
    marker does, so that a rerun repairs its own output)."""
    if not path.exists():
        return
    if not path.is_dir():
        raise NotAnOutput(f"{path}: a file, not an output directory: give a directory to write")
    if all(p.name == ".gitignore" for p in path.iterdir()):
        return
    written: object = stage
    try:
        doc = json.loads((path / marker).read_text())
        if isinstance(doc, dict):
            written = doc.get("stage")
    except FileNotFoundError:
        written = "(none)"
    except (OSError, ValueError):
        pass  # damaged: an earlier output of this writer that the rerun replaces
    if written != stage:
        of = f"of stage {stage}" if stage else "of this writer"
        why = f"no {marker}" if written == "(none)" else f"its {marker} is another stage's"
        raise NotAnOutput(
            f"{path}: holds files that are not an earlier output {of} ({why}), and the output "
            "directory is replaced whole: give a new or empty directory, or move its files away"
        )


@contextmanager
def atomic_dir(path: Path, *, marker: str, stage: str | None = None) -> Iterator[Path]:
    """Yield an empty staging directory `<path>.tmp`; when the block ends normally every file
    in it is fsynced and it replaces the directory `path`; when the block raises it is removed
    and `path` is left as it was. `path` must be missing, empty or an earlier output of the
    same writer (`check_replaceable(path, marker, stage)`), checked before anything is written.

    The previous directory is first renamed aside (`<path>.old`) and removed only after the new
    one is in place, so `path` is missing only between two renames, never half-written.
    """
    path = Path(path)
    check_replaceable(path, marker, stage)
    tmp = path.with_name(path.name + TEMP_SUFFIX)
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a killed run
    tmp.mkdir(parents=True)
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_dir(tmp, path)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (itself included)."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fsync_path(Path(dirpath, name))
        fsync_path(Path(dirpath))


def _swap_dir(new: Path, path: Path) -> None:
    """Put the complete directory `new` at `path`, removing the previous `path` last."""
    old = path.with_name(path.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    # The directory's .gitignore is not the stage's: DVC writes it to keep the outputs it tracks
    # inside (e.g. data/prepared/*.parquet) out of git, and does not write it again on a rerun.
    # Losing it would let `git add` pick up data files (MovieLens may not be redistributed).
    keep = path / ".gitignore"
    if keep.is_file() and not (new / ".gitignore").exists():
        shutil.copy2(keep, new / ".gitignore")
        fsync_path(new / ".gitignore")
    if path.exists():
        os.rename(path, old)
    try:
        os.rename(new, path)
    except OSError:
        if old.exists() and not path.exists():
            os.rename(old, path)  # put the previous output back
        raise
    fsync_path(path.parent)
    if old.exists():
        shutil.rmtree(old)
