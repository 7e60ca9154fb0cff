"""What every pre-training needs before its first step: corpora, model config, id vocabulary, meta.

The `pretrain` stage and each `tune` trial pre-train from the same prepared and tokenized data;
both call `load_inputs`, so a trial trains exactly the model the stage would train with the
same options.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ptum.data import verified
from ptum.data.corpus import Corpus, file_digest, item_texts, load_corpus, tokenizer_digest
from ptum.data.pool import users_digest
from ptum.models.behavior import ID_MIN_COUNT
from ptum.models.id_vocab import IdVocab, build_id_vocab, item_table_digest
from ptum.models.user_model import ARCHITECTURES, ModelConfig
from ptum.tokenize import check_made_from


@dataclass(frozen=True)
class PretrainInputs:
    """The corpora and model of one pre-training.

    meta: what the checkpoint records about its data (architecture, tokenizer and data hashes,
    max_behaviors, item_table_sha256); callers add their own keys.
    """

    train: Corpus
    valid: Corpus
    config: ModelConfig
    id_vocab: IdVocab | None
    meta: dict[str, Any]


def corpus_id_vocab(prepared: Path, train: Corpus, min_count: int) -> IdVocab:
    """The id vocabulary of the pre-training corpus `train` (training users only)."""
    return build_id_vocab(train.items, item_texts(prepared), train.tokens, min_count)


def load_inputs(
    prepared: Path,
    tokenized: Path,
    max_behaviors: int,
    *,
    arch: str,
    behavior_encoder: str = "",
    model_sizes: Mapping[str, int | float] | None = None,
    pool: Sequence[str] | None = None,
) -> PretrainInputs:
    """Load the train / valid corpora and build the model of `arch`.

    behavior_encoder: "" = the architecture's own; "hybrid" adds an item-id embedding whose
    vocabulary (items with >= model_sizes["id_min_count"] training behaviors) is built here;
    "id" reads the item id itself as each item's one token, so both corpora get the (N + 1, 1)
    id column as their token matrix. model_sizes: pretrain.model (word_dim, dim, ...). pool:
    train on these training users only (`ptum.data.pool`; None: all of them).
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(ARCHITECTURES)}")
    sizes = dict(model_sizes or {})
    users = sorted(pool) if pool is not None else None
    train = load_corpus(prepared, tokenized, "train", max_behaviors, users=users)
    check_made_from(item_texts(prepared), train.tokens.numpy(), tokenized)
    valid = load_corpus(prepared, tokenized, "valid", max_behaviors)
    vocab_size = int(verified.read_json(tokenized / "report.json", "tokenize")["vocab_size"])
    id_vocab = None
    if behavior_encoder == "hybrid":
        min_count = int(sizes.get("id_min_count", ID_MIN_COUNT))
        id_vocab = corpus_id_vocab(prepared, train, min_count)
        sizes["id_vocab"] = id_vocab.size
    config = ModelConfig.for_architecture(
        arch,
        behavior_encoder=behavior_encoder,
        vocab_size=vocab_size,
        max_tokens=int(train.tokens.shape[1]),  # T
        max_behaviors=max_behaviors,
        num_items=train.num_items + 1,  # N + 1: row 0 is the padding item
        **sizes,
    )
    meta = {
        "architecture": arch,
        "tokenizer_sha256": tokenizer_digest(tokenized),
        "data_sha256": file_digest(
            [prepared / "sequences.parquet", prepared / "users.parquet", tokenized / "tokens.npy"]
        ),
        "max_behaviors": max_behaviors,
        # The training users pre-trained on, when not all of them (the regime stage's pools).
        "pool": None if users is None else {"users": len(users), "sha256": users_digest(users)},
        # What item id i means; fine-tuning refuses the checkpoint against another tokens.npy.
        "item_table_sha256": item_table_digest(train.tokens),
    }
    if config.behavior_encoder == "id":
        ids = torch.arange(train.num_items + 1).unsqueeze(1)  # (N + 1, 1)
        train, valid = replace(train, tokens=ids), replace(valid, tokens=ids)
    return PretrainInputs(train, valid, config, id_vocab, meta)
