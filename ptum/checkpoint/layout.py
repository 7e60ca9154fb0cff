"""The names of a checkpoint directory (see the package docstring), the LATEST pointer, and the
two encodings every save and read share: tensors as safetensors bytes, meta.json's own hash."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_tensor_bytes

from ptum.hashing import sha256_bytes
from ptum.models import id_vocab as ids
from ptum.models.user_model import UserModel

POINTER = "LATEST"
META = "meta.json"
MODEL = "model.safetensors"
OPTIMIZER = "optimizer.safetensors"
# ckpt-<global step, 8+ digits>; ".next" while it replaces a live checkpoint of the same step.
NAME = re.compile(r"ckpt-(\d{8,})(\.next)?")
STAGING = ".staging-"
# The files of the flat layout, removed from the top of the directory once a save completes.
LEGACY = (MODEL, OPTIMIZER, META, ids.FILE)
# meta.json keys a save computes itself (never carried over from the meta it is given).
WRITTEN_KEYS = (
    "model_sha256",
    "optimizer_sha256",
    "optimizer_scalars",
    "id_vocab_sha256",
    "meta_sha256",
)
# The files meta.json records a hash of, and the key that holds it.
RECORDED = ((MODEL, "model_sha256"), (OPTIMIZER, "optimizer_sha256"), (ids.FILE, "id_vocab_sha256"))


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}"


def step_of(name: str) -> int:
    """The global step in a checkpoint's name; -1 for a name that is not one."""
    m = NAME.fullmatch(name)
    return int(m.group(1)) if m else -1


def read_pointer(directory: Path) -> str | None:
    """The checkpoint LATEST names, or None (no LATEST, or not a checkpoint name)."""
    path = directory / POINTER
    if not path.is_file():
        return None
    name = path.read_text().strip()
    return name if NAME.fullmatch(name) else None


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """safetensors bytes of `tensors` (detached, contiguous, on the CPU)."""
    return save_tensor_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def meta_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of meta's canonical JSON without its own `meta_sha256`."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return sha256_bytes(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def matches_id_vocab(model: UserModel, vocab: ids.IdVocab) -> bool:
    """Whether a hybrid model's id_index buffer is the one `vocab` builds (save and load both
    refuse a pair that is not)."""
    index = model.behavior_encoder.id_index  # a registered buffer (nn.Module types it loosely)
    return isinstance(index, torch.Tensor) and torch.equal(index.cpu(), vocab.id_index())


def meta_bytes(meta: dict[str, Any]) -> bytes:
    """meta.json as written: sorted keys, indent 1, a final newline."""
    return (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode()
