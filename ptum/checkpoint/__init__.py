"""Checkpoints: safetensors weights (no pickle is ever loaded) + a JSON that carries the config.

A checkpoint directory (e.g. models/pretrain/ARCH) holds one complete checkpoint per saved step
and a pointer to the live one:

    LATEST                      "ckpt-00000120": the name of the live checkpoint
    ckpt-00000120/              one complete checkpoint, named by its global step
        model.safetensors       model weights
        optimizer.safetensors   optimizer state tensors (for resuming), optional
        id_vocab.json           hybrid behavior encoder only: its id vocabulary
                                (`ptum.models.id_vocab`)
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

Modules: `layout` (names, pointer, meta.json's hash), `optimizer` (optimizer state without
pickle), `saving` (`save`), `verify` (candidates, hash checks, fallback), `loading` (`load`,
`read_meta`, `live`), `errors`. Everything callers use is imported from here.
"""

from __future__ import annotations

from ptum.checkpoint.errors import (
    CheckpointFallbackWarning,
    CheckpointMismatch,
    CorruptCheckpoint,
)
from ptum.checkpoint.layout import META, MODEL, OPTIMIZER, POINTER, meta_digest, tensor_bytes
from ptum.checkpoint.loading import Loaded, live, load, read_meta
from ptum.checkpoint.optimizer import load_optimizer, optimizer_tensors
from ptum.checkpoint.saving import save, tidy
from ptum.checkpoint.verify import exists

__all__ = [
    "tidy",
    "META",
    "MODEL",
    "OPTIMIZER",
    "POINTER",
    "CheckpointFallbackWarning",
    "CheckpointMismatch",
    "CorruptCheckpoint",
    "Loaded",
    "exists",
    "live",
    "load",
    "load_optimizer",
    "optimizer_tensors",
    "read_meta",
    "save",
]

# Private seams for tests: re-sign an edited meta.json; build a flat-layout checkpoint by hand.
# (A save's file writes go through `saving._write_durable`.)
_meta_digest = meta_digest
_tensor_bytes = tensor_bytes
