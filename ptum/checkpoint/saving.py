"""`save`: one checkpoint as one atomic unit. The files are written into a staging directory
and fsynced, the directory is renamed to ckpt-<step> and its parent fsynced, then LATEST is
replaced atomically; only then is the previous checkpoint removed.

A staging directory is `.staging-ckpt-<step>-<writer>`, `<writer>` this process's PID and a
random token: a save's clean-up removes its own writer's staging directories only, never those
of another process saving into the directory. Those of dead runs go in `tidy`.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch

from ptum.checkpoint.layout import (
    LEGACY,
    META,
    MODEL,
    NAME,
    OPTIMIZER,
    POINTER,
    STAGING,
    WRITTEN_KEYS,
    checkpoint_name,
    matches_id_vocab,
    meta_bytes,
    meta_digest,
    read_pointer,
    tensor_bytes,
)
from ptum.checkpoint.optimizer import optimizer_tensors
from ptum.hashing import sha256_bytes, sha256_file
from ptum.io import atomic_write_bytes, fsync_path, temp_target, write_durable
from ptum.models import id_vocab as ids
from ptum.models.user_model import UserModel

_TOKEN = secrets.token_hex(4)


# Every file of a save is written through this one attribute: the seam tests replace
# (`ptum.checkpoint.saving._write_durable`) to simulate a full disk or a kill between two files.
_write_durable = write_durable


def writer() -> str:
    """This process's part of its staging directories' names: "<PID>.<token>" (the token keeps
    two hosts, or two PID namespaces, on one directory apart; the PID, a forked child)."""
    return f"{os.getpid()}.{_TOKEN}"


def save(
    directory: Path,
    model: torch.nn.Module,
    meta: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    id_vocab: ids.IdVocab | None = None,
) -> Path:
    """Save model (+ optimizer) weights, the id vocabulary and meta.json as one new checkpoint
    `directory/ckpt-<global step>` (the step is meta's `global_step`, 0 without one), switch
    LATEST to it, then remove the previous one. Returns the new checkpoint's path.

    A model that reads item ids (hybrid) must come with its `id_vocab`.
    """
    _check_id_vocab(model, id_vocab)
    directory.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(int(meta.get("global_step", 0)))
    live = read_pointer(directory)
    staging = directory / f"{STAGING}{name}-{writer()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        # Hashes are this save's own (a caller re-saving a loaded meta must not carry old ones).
        meta = {k: v for k, v in meta.items() if k not in WRITTEN_KEYS}
        if id_vocab is not None:
            previous = directory / live if live else None
            meta["id_vocab_sha256"] = _stage_id_vocab(staging, id_vocab, previous)
        meta["model_sha256"] = _stage(staging / MODEL, tensor_bytes(model.state_dict()))
        if optimizer is not None:
            tensors, scalars = optimizer_tensors(optimizer)
            meta["optimizer_sha256"] = _stage(staging / OPTIMIZER, tensor_bytes(tensors))
            meta["optimizer_scalars"] = scalars
        meta["meta_sha256"] = meta_digest(meta)
        _stage(staging / META, meta_bytes(meta))
        fsync_path(staging)
        _commit(directory, staging, name, live)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _remove_stale(directory, keep=name)
    return directory / name


def _check_id_vocab(model: torch.nn.Module, id_vocab: ids.IdVocab | None) -> None:
    """A hybrid model is saved with the id vocabulary its id_index was built from."""
    if isinstance(model, UserModel) and model.uses_item_ids:
        if id_vocab is None:
            raise ValueError("a hybrid model's checkpoint needs its id_vocab")
        if not matches_id_vocab(model, id_vocab):
            raise ValueError("the model's id_index is not the one of the id_vocab being saved")


def _stage(path: Path, data: bytes) -> str:
    """Write one file of the staging directory (fsynced); returns its SHA-256."""
    _write_durable(path, data)
    return sha256_bytes(data)


def _stage_id_vocab(staging: Path, vocab: ids.IdVocab, live: Path | None) -> str:
    """Put id_vocab.json into the staging directory: a hard link to the live checkpoint's copy
    when it is the same vocabulary (large item tables make it megabytes; it is the same every
    epoch), else freshly written."""
    data = vocab.to_json()
    digest = sha256_bytes(data)
    previous = live / ids.FILE if live is not None else None
    if previous is not None and previous.is_file() and sha256_file(previous) == digest:
        try:
            os.link(previous, staging / ids.FILE)
            return digest
        except OSError:
            pass  # no hard links here: write a copy
    return _stage(staging / ids.FILE, data)


def _commit(directory: Path, staging: Path, name: str, live: str | None) -> None:
    """Rename the complete staging directory to `name` and point LATEST at it; LATEST names a
    complete checkpoint at every instant."""
    final = directory / name
    if final.exists() and live == name:
        # Saving the live step again (e.g. interrupted again before any step): go through a
        # second name, so the live checkpoint is only removed once its successor is live.
        nxt = directory / f"{name}.next"
        if nxt.exists():
            shutil.rmtree(nxt)
        os.rename(staging, nxt)
        fsync_path(directory)
        atomic_write_bytes(directory / POINTER, f"{nxt.name}\n".encode())
        staging = nxt
    if final.exists():
        # Not live (left by a crash after its rename, or by an older run), or live no more.
        shutil.rmtree(final)
    os.rename(staging, final)
    fsync_path(directory)
    atomic_write_bytes(directory / POINTER, f"{name}\n".encode())


def tidy(directory: Path) -> None:
    """Finish what a save killed during its clean-up left: remove everything `_remove_stale`
    would beside the live checkpoint (older checkpoints, temp files), and the staging
    directories of every writer. Call it only when the live checkpoint is known good — just
    saved, or just loaded and verified — since the older ones are what a load falls back to,
    and only as the directory's one writer: `ptum pretrain` holds its lock (`ptum.locks`) for
    the whole run, so another process's staging directory there is a dead run's."""
    live = read_pointer(directory)
    if live is not None and (directory / live).is_dir():
        _remove_stale(directory, keep=live, every_writer=True)


def _remove_stale(directory: Path, keep: str, *, every_writer: bool = False) -> None:
    """Remove every checkpoint but `keep`: older ones, staging leftovers of failed or killed
    saves (this writer's only, unless `every_writer`), temp files of killed pointer writes and
    the flat layout's files. Files this module did not write (e.g. demo heads) stay."""
    ours = (*LEGACY, POINTER)
    own = f"-{writer()}"
    for entry in directory.iterdir():
        n = entry.name
        if n == keep or n == POINTER:
            continue
        staging = n.startswith(STAGING) and (every_writer or n.endswith(own))
        if entry.is_dir() and (NAME.fullmatch(n) or staging):
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.is_file() and (
            n in LEGACY or n.removesuffix(".tmp") in ours or temp_target(n) in ours
        ):
            entry.unlink(missing_ok=True)
    fsync_path(directory)
