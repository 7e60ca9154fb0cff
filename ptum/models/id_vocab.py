"""The hybrid behavior encoder's id vocabulary: which items get their own learned id vector.

Built from the pre-training corpus (training users' sequences as the model sees them, i.e. the
last max_behaviors of each): an item with at least `min_count` behaviors there gets its own row of
the id embedding, every other item (rare, never seen, or new at serving time) shares the UNKNOWN
row. Rows: 0 = padding, 1 = UNKNOWN, 2 + i = the i-th vocabulary item in item-id order.

The vocabulary travels with the checkpoint as `id_vocab.json` (canonical JSON; its SHA-256 is
meta.json's `id_vocab_sha256`) and with an ONNX export, where `ptum.serving.embed` maps a log's
texts to rows through its `texts`. It records the hash of the item table (token matrix) its ids
index, so a checkpoint is refused against another item table: item ids are text ranks, and one
added item renumbers the others.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch

from ptum.models.behavior import PAD_ROW, UNKNOWN_ROW

FILE = "id_vocab.json"


def item_table_digest(tokens: torch.Tensor | np.ndarray) -> str:
    """SHA-256 of an (N + 1, T) token matrix as int64 (its shape included): what item id i means."""
    arr = np.ascontiguousarray(np.asarray(tokens), dtype=np.int64)
    h = hashlib.sha256(json.dumps(list(arr.shape)).encode())
    h.update(arr.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class IdVocab:
    """The items with their own id vector (row 2 + i = item_ids[i], whose text is texts[i])."""

    item_ids: tuple[int, ...]  # ascending, each in [1, num_items]
    texts: tuple[str, ...]
    num_items: int  # items of the item table (ids 1..num_items)
    min_count: int
    item_table_sha256: str

    @property
    def size(self) -> int:
        """Rows of the id embedding: padding + UNKNOWN + one per vocabulary item."""
        return 2 + len(self.item_ids)

    def id_index(self) -> torch.Tensor:
        """(num_items + 1,) long: item id -> row (0 -> PAD_ROW, not in the vocabulary -> UNKNOWN)."""
        index = torch.full((self.num_items + 1,), UNKNOWN_ROW, dtype=torch.long)
        index[0] = PAD_ROW
        index[torch.tensor(self.item_ids, dtype=torch.long)] = torch.arange(2, self.size)
        return index

    def to_json(self) -> bytes:
        """Canonical bytes (sorted keys, no whitespace): equal vocabularies, equal bytes."""
        data = {
            "item_ids": list(self.item_ids),
            "texts": list(self.texts),
            "num_items": self.num_items,
            "min_count": self.min_count,
            "item_table_sha256": self.item_table_sha256,
            "rows": {"padding": PAD_ROW, "unknown": UNKNOWN_ROW, "first_item": 2},
        }
        return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_json()).hexdigest()

    @classmethod
    def from_json(cls, data: bytes) -> IdVocab:
        d = json.loads(data)
        return cls(
            item_ids=tuple(d["item_ids"]),
            texts=tuple(d["texts"]),
            num_items=d["num_items"],
            min_count=d["min_count"],
            item_table_sha256=d["item_table_sha256"],
        )


def build_id_vocab(
    sequences: np.ndarray, texts: list[str], tokens: torch.Tensor, min_count: int
) -> IdVocab:
    """The vocabulary of the items with at least `min_count` behaviors in `sequences`.

    Args:
        sequences: (U, L) int64 item ids of the pre-training users, 0 = padding.
        texts: texts[i - 1] is item i's text (the item table, ids 1..N).
        tokens: (N + 1, T) token matrix of the same items (hashed into the vocabulary).
        min_count: behaviors an item needs for its own row (>= 1).
    """
    if min_count < 1:
        raise ValueError(f"id min_count must be >= 1, got {min_count}")
    num_items = tokens.shape[0] - 1
    if len(texts) != num_items:
        raise ValueError(f"{len(texts)} item texts for a token matrix of {num_items} items")
    counts = np.bincount(sequences[sequences > 0].ravel(), minlength=num_items + 1)
    counts[0] = 0
    ids = np.flatnonzero(counts >= min_count)
    return IdVocab(
        item_ids=tuple(int(i) for i in ids),
        texts=tuple(texts[i - 1] for i in ids),
        num_items=num_items,
        min_count=min_count,
        item_table_sha256=item_table_digest(tokens),
    )
