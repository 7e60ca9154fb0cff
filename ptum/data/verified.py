"""Reading what one stage wrote for the next, checked against the SHA-256s the writer recorded.

`ptum prepare` and `ptum tokenize` end by writing `manifest.json` into their output directory
(`write_manifest`): {"stage": STAGE, "files": {name: sha256}} over every other file they wrote.
Every reader of those files goes through this module (`read_parquet`, `load_npy`, `read_json`,
or `verify` for a file read by other means): the file is first checked against the manifest
beside it, then decoded, so one flipped byte is a one-line error naming the file and the fix
(`dvc checkout` restores the cached copy, or rerun the stage) instead of different data, or a
decoder crash (some flips make polars panic, a few abort the process). The ingest manifest
(data/raw) and the checkpoints are checked the same way. Any failure of the decoder itself (a
polars error, a panic in its Rust reader, numpy's ValueError) is the same one-line error
(`DamagedInput`).

A directory without a manifest (written by an older ptum, or by hand) is refused with "rerun
`ptum STAGE`": its files cannot be checked, and reading them unchecked is what this module is
for. A file the manifest does not list is refused too.

Hashing streams the file; the digest is memoized per process by (path, size, mtime_ns), so a
grid that loads the same tables once per cell hashes them once.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ptum.hashing import check_digest, sha256_file_cached, sha256_files

MANIFEST = "manifest.json"  # in each output directory (ptum.paths names the pipeline's)


class DamagedInput(ValueError):
    """A file a stage wrote that cannot be read back as written (one-line message)."""


def fix(stage: str) -> str:
    """What restores an output of `stage`."""
    return f"restore it with `dvc checkout` or rebuild it with `ptum {stage}` (`dvc repro`)"


def write_manifest(directory: Path, stage: str) -> dict:
    """Write `directory`/manifest.json: the SHA-256 of every file directly in `directory` (but
    itself and hidden files); call it last, once every output is written. Returns it."""
    files = {
        name: digest
        for name, digest in sha256_files(directory).items()
        if name != MANIFEST and not name.startswith(".")
    }
    manifest = {"stage": stage, "files": files}
    (Path(directory) / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def _manifest(directory: Path, stage: str) -> dict[str, str]:
    """{name: sha256} of `directory`'s manifest; DamagedInput when it is missing or unreadable."""
    path = directory / MANIFEST
    if not path.is_file():
        raise DamagedInput(
            f"{path}: missing, so the files of {directory} cannot be checked (written by an older "
            f"ptum, or not by `ptum {stage}`); rerun `ptum {stage}`"
        )
    try:
        files = json.loads(path.read_bytes())["files"]
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise TypeError("files is not a {name: sha256} object")
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise DamagedInput(f"{path}: not a readable manifest ({e}); {fix(stage)}") from None
    return files


def verify(path: Path, stage: str) -> Path:
    """`path` unchanged since `stage` wrote it: its SHA-256 is the one the manifest beside it
    records. Raises FileNotFoundError (with its filename), DamagedInput (no manifest, or not
    listed in it) or HashMismatch, each one line naming the file and the fix; returns `path`."""
    path = Path(path)
    if not path.is_file():  # the CLI names the file and the stage that writes it
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
    files = _manifest(path.parent, stage)
    where = path.parent / MANIFEST
    expected = files.get(path.name)
    if expected is None:
        raise DamagedInput(f"{path}: not written by `ptum {stage}` (not in {where}); {fix(stage)}")
    check_digest(path, sha256_file_cached(path), expected, where, fix(stage))
    return path


def decoder_failure(exc: BaseException) -> str | None:
    """'polars ComputeError', 'pyo3_runtime PanicException', ... for an error raised by a
    native decoder, else None. PanicException derives from BaseException, not Exception: it is
    matched by name, like every native class here, so that no import is needed to name it."""
    for cls in type(exc).__mro__:
        module = (cls.__module__ or "").split(".")[0]
        if module == "polars" and issubclass(cls, Exception) and not issubclass(cls, Warning):
            return f"polars {cls.__name__}"
        if cls.__name__ == "PanicException":
            return f"{module} PanicException"
    return None


@contextmanager
def decoding(path: Path, remedy: str, also: tuple[type[Exception], ...] = ()) -> Iterator[None]:
    """Turn a decoder failure inside the block (`decoder_failure`, or one of `also`) into a
    DamagedInput naming `path` and `remedy`."""
    try:
        yield
    except BaseException as exc:
        kind = decoder_failure(exc)
        if kind is None and isinstance(exc, also):
            kind = type(exc).__name__
        if kind is None:
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        message = f"{kind} while reading {path}: {first}; the file is damaged: {remedy}"
        raise DamagedInput(message) from exc


def read_parquet(path: Path, stage: str, columns: list[str] | None = None) -> pl.DataFrame:
    """The checked Parquet table `path` (its `columns`, default all) as `stage` wrote it."""
    verify(path, stage)
    with decoding(path, fix(stage)):
        return pl.read_parquet(path, columns=columns)


def load_npy(path: Path, stage: str) -> np.ndarray:
    """The checked .npy array `path` (no pickles) as `stage` wrote it."""
    verify(path, stage)
    with decoding(path, fix(stage), also=(ValueError, EOFError)):
        return np.load(path, allow_pickle=False)


def read_json(path: Path, stage: str) -> Any:
    """The checked JSON file `path` (a stage's report) as `stage` wrote it."""
    verify(path, stage)
    with decoding(path, fix(stage), also=(ValueError,)):  # JSONDecodeError, UnicodeDecodeError
        return json.loads(Path(path).read_bytes())
