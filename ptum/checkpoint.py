"""Checkpoints: safetensors weights (no pickle is ever loaded) + a JSON that carries the config.

A checkpoint directory (e.g. models/pretrain/ARCH) holds one complete checkpoint per saved step
and a pointer to the live one:

    LATEST                      "ckpt-00000120": the name of the live checkpoint
    ckpt-00000120/              one complete checkpoint, named by its global step
        model.safetensors       model weights
        optimizer.safetensors   optimizer state tensors (for resuming), optional
        id_vocab.json           hybrid behavior encoder only: its id vocabulary
                                (`ptum.pretrain.id_vocab`)
        meta.json               model config, training params, epoch/step, tokenizer and data
                                hashes, the optimizer's scalar state, the SHA-256 of every other
                                file of the checkpoint, and `meta_sha256`: the SHA-256 of its own
                                content (canonical JSON without that key)

A save is one atomic unit: the files are written into a staging directory and fsynced, the
directory is renamed to its final name and the parent fsynced, then LATEST is replaced
(write, fsync, rename, fsync); only then is the previous checkpoint removed. A kill or a full
disk at any point leaves the previous complete checkpoint live. Every read verifies each file
against the hash its meta.json recorded; a checkpoint that fails (or a LATEST naming a missing
one) makes `load` fall back, with a warning, to the newest earlier complete checkpoint, and fail
with a one-line error naming the file when there is none. Nothing in the directory depends on
when or how fast it was written, so equal training gives byte-equal directories (DVC caching).

Directories in the older flat layout (the files above directly in the directory, no LATEST) are
still read; the next save replaces them with the layout above.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensor_bytes
from safetensors.torch import save as save_tensor_bytes

from ptum.models.user_model import ModelConfig, UserModel
from ptum.pretrain import id_vocab as ids

POINTER = "LATEST"
META = "meta.json"
MODEL = "model.safetensors"
OPTIMIZER = "optimizer.safetensors"
_NAME = re.compile(r"ckpt-(\d{8,})(\.next)?")
_STAGING = ".staging-"
# The files of the flat layout, removed from the top of the directory once a save completes.
_LEGACY = (MODEL, OPTIMIZER, META, ids.FILE)
_WRITTEN_KEYS = (
    "model_sha256",
    "optimizer_sha256",
    "optimizer_scalars",
    "id_vocab_sha256",
    "meta_sha256",
)


class CheckpointMismatch(ValueError):
    """A checkpoint that does not fit the tokenizer, data or model it is loaded into."""


class CorruptCheckpoint(CheckpointMismatch):
    """A checkpoint file whose bytes are not the ones recorded when it was written."""


class CheckpointFallbackWarning(UserWarning):
    """The live checkpoint was incomplete or corrupt; an earlier complete one is used."""


# ---------------------------------------------------------------- durable writes


def _fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes its renames durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes) -> None:
    """Write `path` and fsync it (the caller renames and fsyncs the directory)."""
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _replace_durable(path: Path, data: bytes) -> None:
    """Atomically replace `path` by `data`: temp file, fsync, rename, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    _write_durable(tmp, data)
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save_tensor_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def _meta_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of meta's canonical JSON without its own `meta_sha256`."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return _sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


# ---------------------------------------------------------------- optimizer state


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (safetensors) and JSON-able scalars."""
    state = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for pid, st in state["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{name}"] = value
            else:
                scalars["state"].setdefault(str(pid), {})[name] = value
    return tensors, scalars


def load_optimizer(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], scalars: dict
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, st in scalars["state"].items():
        state.setdefault(int(pid), {}).update(st)
    opt.load_state_dict({"state": state, "param_groups": scalars["param_groups"]})


# ---------------------------------------------------------------- save


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
    if isinstance(model, UserModel) and model.uses_item_ids:
        if id_vocab is None:
            raise ValueError("a hybrid model's checkpoint needs its id_vocab")
        if not torch.equal(model.behavior_encoder.id_index.cpu(), id_vocab.id_index()):
            raise ValueError("the model's id_index is not the one of the id_vocab being saved")
    directory.mkdir(parents=True, exist_ok=True)
    step = int(meta.get("global_step", 0))
    name = f"ckpt-{step:08d}"
    live = _read_pointer(directory)
    staging = directory / f"{_STAGING}{name}-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        # Hashes are this save's own (a caller re-saving a loaded meta must not carry old ones).
        meta = {k: v for k, v in meta.items() if k not in _WRITTEN_KEYS}
        if id_vocab is not None:
            meta["id_vocab_sha256"] = _stage_id_vocab(
                staging, id_vocab, directory / live if live else None
            )
        data = _tensor_bytes(model.state_dict())
        _write_durable(staging / MODEL, data)
        meta["model_sha256"] = _sha256(data)
        if optimizer is not None:
            tensors, scalars = optimizer_tensors(optimizer)
            data = _tensor_bytes(tensors)
            _write_durable(staging / OPTIMIZER, data)
            meta["optimizer_sha256"] = _sha256(data)
            meta["optimizer_scalars"] = scalars
        meta["meta_sha256"] = _meta_digest(meta)
        _write_durable(staging / META, (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode())
        _fsync_path(staging)
        _commit(directory, staging, name, live)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _remove_stale(directory, keep=name)
    return directory / name


def _stage_id_vocab(staging: Path, vocab: ids.IdVocab, live: Path | None) -> str:
    """Put id_vocab.json into the staging directory: a hard link to the live checkpoint's copy
    when it is the same vocabulary (large item tables make it megabytes; it is the same every
    epoch), else freshly written."""
    data = vocab.to_json()
    digest = _sha256(data)
    previous = live / ids.FILE if live is not None else None
    if previous is not None and previous.is_file() and _sha256(previous.read_bytes()) == digest:
        try:
            os.link(previous, staging / ids.FILE)
            return digest
        except OSError:
            pass  # no hard links here: write a copy
    _write_durable(staging / ids.FILE, data)
    return digest


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
        _fsync_path(directory)
        _replace_durable(directory / POINTER, f"{nxt.name}\n".encode())
        staging = nxt
    if final.exists():
        # Not live (left by a crash after its rename, or by an older run), or live no more.
        shutil.rmtree(final)
    os.rename(staging, final)
    _fsync_path(directory)
    _replace_durable(directory / POINTER, f"{name}\n".encode())


def _remove_stale(directory: Path, keep: str) -> None:
    """Remove every checkpoint but `keep`: older ones, staging leftovers of killed saves and the
    flat layout's files. Files this module did not write (e.g. demo heads) stay."""
    for entry in directory.iterdir():
        n = entry.name
        if n == keep or n == POINTER:
            continue
        if entry.is_dir() and (_NAME.fullmatch(n) or n.startswith(_STAGING)):
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.is_file() and (n in _LEGACY or n.removesuffix(".tmp") in (*_LEGACY, POINTER)):
            entry.unlink(missing_ok=True)
    _fsync_path(directory)


# ---------------------------------------------------------------- find and verify


def _read_pointer(directory: Path) -> str | None:
    path = directory / POINTER
    if not path.is_file():
        return None
    name = path.read_text().strip()
    return name if _NAME.fullmatch(name) else None


def _step_of(name: str) -> int:
    m = _NAME.fullmatch(name)
    return int(m.group(1)) if m else -1


def _candidates(directory: Path) -> list[tuple[Path, bool]]:
    """(path, flat layout?) of every checkpoint of `directory`: the live one first, then the
    others newest first, then the flat layout's."""
    live = _read_pointer(directory)
    found = []
    if directory.is_dir():
        found = [e.name for e in directory.iterdir() if e.is_dir() and _NAME.fullmatch(e.name)]
    found.sort(key=lambda n: (_step_of(n), n.endswith(".next")), reverse=True)
    order = ([live] if live else []) + [n for n in found if n != live]
    paths = [(directory / n, False) for n in order]
    if (directory / META).is_file():
        paths.append((directory, True))
    return paths


def exists(directory: Path) -> bool:
    """Whether `directory` holds anything that claims to be a checkpoint (complete or not)."""
    return bool(_candidates(directory))


@dataclass
class _Verified:
    path: Path
    meta: dict[str, Any]
    files: dict[str, bytes]  # verified contents by file name


def _verify(path: Path, flat: bool = False) -> _Verified:
    """Read one checkpoint, checking meta.json's own hash and every file it records."""
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
        if meta.get("meta_sha256") != _meta_digest(meta):
            raise CorruptCheckpoint(
                f"{meta_path}: content does not match its recorded meta_sha256 (edited or corrupt)"
            )
        if not flat and int(meta.get("global_step", 0)) != _step_of(path.name):
            raise CorruptCheckpoint(
                f"{meta_path}: global_step {meta.get('global_step')} does not match "
                f"the checkpoint's name {path.name}"
            )
    files = {}
    recorded = (
        (MODEL, "model_sha256"),
        (OPTIMIZER, "optimizer_sha256"),
        (ids.FILE, "id_vocab_sha256"),
    )
    for name, key in recorded:
        if key not in meta:
            continue
        file = path / name
        if not file.is_file():
            raise CorruptCheckpoint(f"{file}: missing; {META} records {key}")
        data = file.read_bytes()
        if _sha256(data) != meta[key]:
            raise CorruptCheckpoint(
                f"{file}: does not match the hash recorded in {META} (corrupt or torn save?)"
            )
        files[name] = data
    if MODEL not in files:
        raise CorruptCheckpoint(f"{meta_path}: records no model_sha256")
    return _Verified(path, meta, files)


def _resolve(directory: Path) -> _Verified:
    """The live checkpoint of `directory` if it verifies, else the newest one that does (with a
    warning). One-line errors: FileNotFoundError for no checkpoint at all, CorruptCheckpoint
    when none verifies."""
    for _ in range(3):
        live = _read_pointer(directory)
        try:
            return _resolve_once(directory, live)
        except CorruptCheckpoint:
            if _read_pointer(directory) == live:
                raise
            # A save committed while we read (and removed what we were reading): read again.
    return _resolve_once(directory, _read_pointer(directory))


def _resolve_once(directory: Path, live: str | None) -> _Verified:
    candidates = _candidates(directory)
    if not candidates:
        hint = f" (LATEST names {live}, which is missing)" if live else ""
        raise FileNotFoundError(f"{directory}: no checkpoint (meta.json missing){hint}")
    problems = []
    if live and not (directory / live).is_dir():
        problems.append(f"{directory / POINTER} names {live}, which is missing")
    for path, flat in candidates:
        try:
            found = _verify(path, flat)
        except (CorruptCheckpoint, FileNotFoundError) as e:
            problems.append(str(e))
            continue
        if problems:
            warnings.warn(
                f"{directory}: using the earlier complete checkpoint {found.path.name} "
                f"(step {found.meta.get('global_step', '?')}): {'; '.join(problems)}",
                CheckpointFallbackWarning,
                stacklevel=4,
            )
        return found
    raise CorruptCheckpoint(
        f"{problems[0]}; no earlier complete checkpoint in {directory}: "
        f"remove it and re-run `ptum pretrain --arch {_arch_hint(directory)}`"
    )


def _arch_hint(directory: Path) -> str:
    return directory.name if directory.parent.name == "pretrain" else "ARCH"


# ---------------------------------------------------------------- load


@dataclass
class Loaded:
    model: UserModel
    meta: dict[str, Any]
    optimizer_tensors: dict[str, torch.Tensor] | None
    id_vocab: ids.IdVocab | None = None  # the hybrid encoder's id vocabulary
    path: Path | None = None  # the checkpoint read (directory/ckpt-<step>)


def live(directory: Path) -> Path:
    """The checkpoint `load` would read: directory/ckpt-<step> (or `directory` itself in the
    flat layout)."""
    return _resolve(directory).path


def read_meta(directory: Path) -> dict[str, Any]:
    """meta.json of the checkpoint `load` would read (every file of it verified)."""
    return _resolve(directory).meta


def load(
    directory: Path,
    *,
    tokenizer_sha256: str | None = None,
    expect_config: ModelConfig | None = None,
    with_optimizer: bool = False,
    map_location: str | torch.device = "cpu",
    item_table_sha256: str | None = None,
    id_vocab_sha256: str | None = None,
) -> Loaded:
    """Rebuild the model from the checkpoint's own config and load its weights.

    Reads the live checkpoint of `directory`, or the newest complete one when the live one is
    torn or corrupt (`CheckpointFallbackWarning`). Refuses (CheckpointMismatch) a checkpoint
    trained with another tokenizer, or whose config differs from `expect_config`, or on another
    item table than `item_table_sha256` (`ptum.pretrain.id_vocab.item_table_digest` of the
    current token matrix: fine-tuning, export), when it recorded one. For a model that reads
    item ids (hybrid), also one whose id vocabulary differs from `id_vocab_sha256` (a resumed
    pre-training).
    """
    found = _resolve(directory)
    meta, where = found.meta, found.path
    config = ModelConfig.from_dict(meta["model_config"])
    arch = meta.get("architecture", "ARCH")
    if tokenizer_sha256 is not None and meta.get("tokenizer_sha256") != tokenizer_sha256:
        raise CheckpointMismatch(
            f"{directory}: trained with tokenizer {meta.get('tokenizer_sha256', '?')[:12]}..., "
            f"but the current SentencePiece model is {tokenizer_sha256[:12]}...: token ids would "
            "mean different words. Re-run pre-training on the current tokenizer."
        )
    recorded = meta.get("item_table_sha256")
    if item_table_sha256 is not None and recorded is not None and recorded != item_table_sha256:
        raise CheckpointMismatch(
            f"{directory}: trained on item table (tokens.npy) {recorded[:12]}..., but the "
            f"current one is {item_table_sha256[:12]}...: item ids would name other items. "
            f"Re-run `ptum pretrain --arch {arch}` on the current data."
        )
    vocab = None
    if config.behavior_encoder == "hybrid":
        if ids.FILE not in found.files:
            raise CorruptCheckpoint(
                f"{where / ids.FILE}: missing; a hybrid checkpoint needs its id vocabulary"
            )
        vocab = ids.IdVocab.from_json(found.files[ids.FILE])
        if item_table_sha256 is not None and vocab.item_table_sha256 != item_table_sha256:
            raise CheckpointMismatch(
                f"{where / ids.FILE}: item ids index item table "
                f"{vocab.item_table_sha256[:12]}..., but the current one (tokens.npy) is "
                f"{item_table_sha256[:12]}...: ids would name other items. "
                f"Re-run `ptum pretrain --arch {arch}` on the current data."
            )
        if id_vocab_sha256 is not None and vocab.sha256 != id_vocab_sha256:
            raise CheckpointMismatch(
                f"{where / ids.FILE}: id vocabulary {vocab.sha256[:12]}... differs from "
                f"this run's {id_vocab_sha256[:12]}... (other item table, pre-training users or "
                f"id_min_count): remove {directory} and re-run `ptum pretrain --arch {arch}`."
            )
    if expect_config is not None and expect_config != config:
        diff = {
            k: (v, getattr(expect_config, k))
            for k, v in config.to_dict().items()
            if getattr(expect_config, k) != v
        }
        raise CheckpointMismatch(
            f"{directory}: encoder config differs from the requested one "
            f"(checkpoint, requested): {diff}"
        )
    device = str(map_location)
    model = UserModel(config=config)
    state = {k: v.to(device) for k, v in load_tensor_bytes(found.files[MODEL]).items()}
    model.load_state_dict(state)
    if vocab is not None and not torch.equal(
        model.behavior_encoder.id_index.cpu(), vocab.id_index()
    ):
        raise CorruptCheckpoint(f"{where / MODEL}: id_index does not match {where / ids.FILE}")
    opt = None
    if with_optimizer and OPTIMIZER in found.files:
        opt = {k: v.to(device) for k, v in load_tensor_bytes(found.files[OPTIMIZER]).items()}
    return Loaded(model, meta, opt, vocab, where)
