"""Checkpoints: safetensors weights (no pickle is ever loaded) + a JSON that carries the config.

A checkpoint directory holds:
    model.safetensors       model weights
    optimizer.safetensors   optimizer state tensors (for resuming), optional
    meta.json               model config, training params, epoch/step, tokenizer and data hashes,
                            the optimizer's scalar state, and the SHA-256 of both weight files
    id_vocab.json           hybrid behavior encoder only: its id vocabulary
                            (`ptum.pretrain.id_vocab`), hashed in meta.json as id_vocab_sha256

Every file is written to a temporary name and renamed into place; meta.json goes last and names
the weight files' hashes, so a crash mid-save can never pair new weights with old metadata.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ptum.models.user_model import ModelConfig, UserModel
from ptum.pretrain import id_vocab as ids


class CheckpointMismatch(ValueError):
    """A checkpoint that does not fit the tokenizer, data or model it is loaded into."""


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


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


def save(
    directory: Path,
    model: torch.nn.Module,
    meta: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    id_vocab: ids.IdVocab | None = None,
) -> None:
    """Save model (+ optimizer) weights, the id vocabulary and meta.json atomically into
    `directory`. A model that reads item ids (hybrid) must come with its `id_vocab`."""
    directory.mkdir(parents=True, exist_ok=True)
    meta = dict(meta)
    if isinstance(model, UserModel) and model.uses_item_ids:
        if id_vocab is None:
            raise ValueError("a hybrid model's checkpoint needs its id_vocab")
        if not torch.equal(model.behavior_encoder.id_index.cpu(), id_vocab.id_index()):
            raise ValueError("the model's id_index is not the one of the id_vocab being saved")
    if id_vocab is not None:
        data = id_vocab.to_json()
        path = directory / ids.FILE
        # Written once per run, not every epoch: large item tables make it megabytes.
        if not path.exists() or path.read_bytes() != data:
            _atomic_write_bytes(path, data)
        meta["id_vocab_sha256"] = id_vocab.sha256
    meta["model_sha256"] = _save_tensors(directory / "model.safetensors", model.state_dict())
    if optimizer is not None:
        tensors, scalars = optimizer_tensors(optimizer)
        meta["optimizer_sha256"] = _save_tensors(directory / "optimizer.safetensors", tensors)
        meta["optimizer_scalars"] = scalars
    _atomic_write_bytes(
        directory / "meta.json", (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode()
    )


@dataclass
class Loaded:
    model: UserModel
    meta: dict[str, Any]
    optimizer_tensors: dict[str, torch.Tensor] | None
    id_vocab: ids.IdVocab | None = None  # the hybrid encoder's id vocabulary


def read_meta(directory: Path) -> dict[str, Any]:
    path = directory / "meta.json"
    if not path.exists():
        raise FileNotFoundError(f"{directory}: no checkpoint (meta.json missing)")
    return json.loads(path.read_text())


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

    Refuses (CheckpointMismatch) a checkpoint trained with another tokenizer, or whose config
    differs from `expect_config`, or whose files do not match the hashes in meta.json. For a
    model that reads item ids (hybrid), also one whose id vocabulary indexes another item table
    than `item_table_sha256` (`ptum.pretrain.id_vocab.item_table_digest` of the current token
    matrix: fine-tuning, export) or differs from `id_vocab_sha256` (a resumed pre-training).
    """
    meta = read_meta(directory)
    config = ModelConfig.from_dict(meta["model_config"])
    arch = meta.get("architecture", "ARCH")
    if tokenizer_sha256 is not None and meta.get("tokenizer_sha256") != tokenizer_sha256:
        raise CheckpointMismatch(
            f"{directory}: trained with tokenizer {meta.get('tokenizer_sha256', '?')[:12]}..., "
            f"but the current SentencePiece model is {tokenizer_sha256[:12]}...: token ids would "
            "mean different words. Re-run pre-training on the current tokenizer."
        )
    vocab = None
    if config.behavior_encoder == "hybrid":
        vocab = _read_id_vocab(directory, meta)
        if item_table_sha256 is not None and vocab.item_table_sha256 != item_table_sha256:
            raise CheckpointMismatch(
                f"{directory / ids.FILE}: item ids index item table "
                f"{vocab.item_table_sha256[:12]}..., but the current one (tokens.npy) is "
                f"{item_table_sha256[:12]}...: ids would name other items. "
                f"Re-run `ptum pretrain --arch {arch}` on the current data."
            )
        if id_vocab_sha256 is not None and vocab.sha256 != id_vocab_sha256:
            raise CheckpointMismatch(
                f"{directory / ids.FILE}: id vocabulary {vocab.sha256[:12]}... differs from "
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
    weights = directory / "model.safetensors"
    if hashlib.sha256(weights.read_bytes()).hexdigest() != meta.get("model_sha256"):
        raise CheckpointMismatch(f"{weights}: does not match the hash in meta.json (torn save?)")
    model = UserModel(config=config)
    model.load_state_dict(load_file(str(weights), device=str(map_location)))
    if vocab is not None and not torch.equal(
        model.behavior_encoder.id_index.cpu(), vocab.id_index()
    ):
        raise CheckpointMismatch(f"{weights}: id_index does not match {directory / ids.FILE}")
    opt = None
    if with_optimizer and (directory / "optimizer.safetensors").exists():
        opt = load_file(str(directory / "optimizer.safetensors"), device=str(map_location))
    return Loaded(model, meta, opt, vocab)


def _read_id_vocab(directory: Path, meta: dict[str, Any]) -> ids.IdVocab:
    """The checkpoint's id vocabulary, checked against the hash in meta.json."""
    path = directory / ids.FILE
    if not path.exists():
        raise CheckpointMismatch(f"{path}: missing; a hybrid checkpoint needs its id vocabulary")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta.get("id_vocab_sha256"):
        raise CheckpointMismatch(f"{path}: does not match the hash in meta.json (torn save?)")
    return ids.IdVocab.from_json(data)
