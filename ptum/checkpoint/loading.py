"""`load`: rebuild the model from a checkpoint's own config, after checking that the checkpoint
fits what it is loaded into (tokenizer, item table, id vocabulary, requested config)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensor_bytes

from ptum.checkpoint.errors import CheckpointMismatch, CorruptCheckpoint
from ptum.checkpoint.layout import MODEL, OPTIMIZER, matches_id_vocab
from ptum.checkpoint.verify import Verified, resolve
from ptum.models import id_vocab as ids
from ptum.models.user_model import ModelConfig, UserModel


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
    return resolve(directory).path


def read_meta(directory: Path) -> dict[str, Any]:
    """meta.json of the checkpoint `load` would read (every file of it verified)."""
    return resolve(directory).meta


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
    item table than `item_table_sha256` (`ptum.models.id_vocab.item_table_digest` of the
    current token matrix: fine-tuning, export), when it recorded one. For a model that reads
    item ids (hybrid), also one whose id vocabulary differs from `id_vocab_sha256` (a resumed
    pre-training).
    """
    found = resolve(directory)
    meta = found.meta
    config = ModelConfig.from_dict(meta["model_config"])
    _check_inputs(directory, meta, tokenizer_sha256, item_table_sha256)
    vocab = None
    if config.behavior_encoder == "hybrid":
        vocab = _id_vocab(directory, found, item_table_sha256, id_vocab_sha256)
    _check_config(directory, config, expect_config)
    device = str(map_location)
    model = UserModel(config=config)
    model.load_state_dict(_tensors(found, MODEL, device))
    if vocab is not None and not matches_id_vocab(model, vocab):
        raise CorruptCheckpoint(
            f"{found.path / MODEL}: id_index does not match {found.path / ids.FILE}"
        )
    opt = None
    if with_optimizer and OPTIMIZER in found.files:
        opt = _tensors(found, OPTIMIZER, device)
    return Loaded(model, meta, opt, vocab, found.path)


def _tensors(found: Verified, name: str, device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in load_tensor_bytes(found.files[name]).items()}


def _check_inputs(
    directory: Path,
    meta: dict[str, Any],
    tokenizer_sha256: str | None,
    item_table_sha256: str | None,
) -> None:
    """The checkpoint was trained with this tokenizer and (when it recorded one) item table."""
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


def _id_vocab(
    directory: Path,
    found: Verified,
    item_table_sha256: str | None,
    id_vocab_sha256: str | None,
) -> ids.IdVocab:
    """A hybrid checkpoint's id vocabulary, checked against the current item table and, for a
    resumed pre-training, the run's own vocabulary."""
    where, arch = found.path, found.meta.get("architecture", "ARCH")
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
    return vocab


def _check_config(directory: Path, config: ModelConfig, expect: ModelConfig | None) -> None:
    """The checkpoint's encoder config is the requested one (when one is requested)."""
    if expect is None or expect == config:
        return
    diff = {
        k: (v, getattr(expect, k)) for k, v in config.to_dict().items() if getattr(expect, k) != v
    }
    raise CheckpointMismatch(
        f"{directory}: encoder config differs from the requested one (checkpoint, requested): "
        f"{diff}"
    )
