"""Find the checkpoint a read uses: every candidate is verified against the hashes its meta.json
recorded (and meta.json against its own); the live one when it verifies, else the newest
complete one, with a warning; a one-line error naming the file when none does."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ptum.checkpoint.errors import CheckpointFallbackWarning, CorruptCheckpoint
from ptum.checkpoint.layout import (
    META,
    MODEL,
    NAME,
    POINTER,
    RECORDED,
    meta_digest,
    read_pointer,
    step_of,
)
from ptum.hashing import sha256_bytes


@dataclass
class Verified:
    path: Path  # directory/ckpt-<step>, or the directory itself in the flat layout
    meta: dict[str, Any]
    files: dict[str, bytes]  # verified contents by file name


def candidates(directory: Path) -> list[tuple[Path, bool]]:
    """(path, flat layout?) of every checkpoint of `directory`: the live one first, then the
    others newest first, then the flat layout's."""
    live = read_pointer(directory)
    found = []
    if directory.is_dir():
        found = [e.name for e in directory.iterdir() if e.is_dir() and NAME.fullmatch(e.name)]
    found.sort(key=lambda n: (step_of(n), n.endswith(".next")), reverse=True)
    order = ([live] if live else []) + [n for n in found if n != live]
    paths = [(directory / n, False) for n in order]
    if (directory / META).is_file():
        paths.append((directory, True))
    return paths


def exists(directory: Path) -> bool:
    """Whether `directory` holds anything that claims to be a checkpoint (complete or not)."""
    return bool(candidates(directory))


def verify(path: Path, flat: bool = False) -> Verified:
    """Read one checkpoint, checking meta.json's own hash and every file it records."""
    meta = _read_meta(path, flat)
    files = {}
    for name, key in RECORDED:
        if key not in meta:
            continue
        file = path / name
        if not file.is_file():
            raise CorruptCheckpoint(f"{file}: missing; {META} records {key}")
        data = file.read_bytes()
        if sha256_bytes(data) != meta[key]:
            raise CorruptCheckpoint(
                f"{file}: does not match the hash recorded in {META} (corrupt or torn save?)"
            )
        files[name] = data
    if MODEL not in files:
        raise CorruptCheckpoint(f"{path / META}: records no model_sha256")
    return Verified(path, meta, files)


def _read_meta(path: Path, flat: bool) -> dict[str, Any]:
    """meta.json of one checkpoint, checked against its own hash and the checkpoint's name."""
    meta_path = path / META
    if not meta_path.is_file():
        raise CorruptCheckpoint(f"{meta_path}: missing (incomplete save)")
    try:
        meta = json.loads(meta_path.read_bytes())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise CorruptCheckpoint(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CorruptCheckpoint(f"{meta_path}: not a JSON object")
    if "meta_sha256" in meta or not flat:
        # The flat layout predates meta's own hash; a checkpoint directory always has one.
        if meta.get("meta_sha256") != meta_digest(meta):
            raise CorruptCheckpoint(
                f"{meta_path}: content does not match its recorded meta_sha256 (edited or corrupt)"
            )
        if not flat and int(meta.get("global_step", 0)) != step_of(path.name):
            raise CorruptCheckpoint(
                f"{meta_path}: global_step {meta.get('global_step')} does not match "
                f"the checkpoint's name {path.name}"
            )
    return meta


def resolve(directory: Path) -> Verified:
    """The live checkpoint of `directory` if it verifies, else the newest one that does (with a
    warning). One-line errors: FileNotFoundError for no checkpoint at all, CorruptCheckpoint
    when none verifies."""
    for _ in range(3):
        live = read_pointer(directory)
        try:
            return _resolve_once(directory, live)
        except CorruptCheckpoint:
            if read_pointer(directory) == live:
                raise
            # A save committed while we read (and removed what we were reading): read again.
    return _resolve_once(directory, read_pointer(directory))


def _resolve_once(directory: Path, live: str | None) -> Verified:
    found = candidates(directory)
    if not found:
        hint = f" (LATEST names {live}, which is missing)" if live else ""
        raise FileNotFoundError(f"{directory}: no checkpoint (meta.json missing){hint}")
    problems = []
    if live and not (directory / live).is_dir():
        problems.append(f"{directory / POINTER} names {live}, which is missing")
    for path, flat in found:
        try:
            verified = verify(path, flat)
        except (CorruptCheckpoint, FileNotFoundError) as e:
            problems.append(str(e))
            continue
        if problems:
            warnings.warn(
                f"{directory}: using the earlier complete checkpoint {verified.path.name} "
                f"(step {verified.meta.get('global_step', '?')}): {'; '.join(problems)}",
                CheckpointFallbackWarning,
                stacklevel=4,  # the caller of load, read_meta or live
            )
        return verified
    raise CorruptCheckpoint(
        f"{problems[0]}; no earlier complete checkpoint in {directory}: "
        f"remove it and re-run `ptum pretrain --arch {_arch_hint(directory)}`"
    )


def _arch_hint(directory: Path) -> str:
    return directory.name if directory.parent.name == "pretrain" else "ARCH"
