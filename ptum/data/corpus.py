"""The pre-training corpus and the files it comes from: padded user sequences of the prepared
data with the item token matrix, the digests that name a data version, and the order in which
batches draw users. Shared by pre-training, fine-tuning, tuning and serving (so it sits below
them all); every file is read checked against its stage's manifest (`ptum.data.verified`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from ptum.data import verified
from ptum.hashing import HashMismatch


@dataclass(frozen=True)
class Corpus:
    """Right-padded user sequences of one split plus the item token matrix.

    items: (U, L) int64 item ids, 0 = padding; gaps: (U, L) int64 seconds; lengths: (U,).
    tokens: (N + 1, T) int64 token matrix (row 0 = padding item).
    pool: every behavior's item id, the popularity-weighted negative pool.
    """

    user_ids: list[str]
    items: np.ndarray
    gaps: np.ndarray
    lengths: np.ndarray
    tokens: torch.Tensor
    pool: np.ndarray

    @property
    def num_items(self) -> int:
        return self.tokens.shape[0] - 1


def file_digest(paths: list[Path]) -> str:
    """SHA-256 over the bytes of several files (the data version a checkpoint was trained on)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def pad_column(lists: pl.Series, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad a list column (keeping the last max_len of each list) -> ((U, max_len) int64,
    lengths (U,)). Columnar throughout: no Python object per user or behavior."""
    tail = lists.list.tail(max_len)
    lengths = tail.list.len().fill_null(0).to_numpy().astype(np.int64)
    flat = tail.explode().drop_nulls().to_numpy().astype(np.int64)
    out = np.zeros((len(lists), max_len), dtype=np.int64)
    rows = np.repeat(np.arange(len(lists)), lengths)
    cols = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[rows, cols] = flat
    return out, lengths


def load_corpus(
    prepared: Path,
    tokenized: Path,
    split: str,
    max_len: int,
    view: str = "before_test",
    users: list[str] | None = None,
) -> Corpus:
    """Load one pre-training split ("train" / "valid") of the `before_test` view, or a given
    list of users of any view (for downstream tasks)."""
    seqs = verified.read_parquet(prepared / "sequences.parquet", "prepare")
    seqs = seqs.filter(pl.col("view") == view)
    if users is None:
        keep = verified.read_parquet(prepared / "users.parquet", "prepare")
        keep = keep.filter(pl.col("pretrain_split") == split)
        seqs = seqs.join(keep.select("user_id"), on="user_id").sort("user_id")
    else:
        order = pl.DataFrame({"user_id": users}).with_row_index("__i")
        seqs = order.join(seqs, on="user_id", how="left").sort("__i")
        seqs = seqs.with_columns(pl.col("item_ids").fill_null([]), pl.col("gaps").fill_null([]))
    items, lengths = pad_column(seqs["item_ids"], max_len)
    gaps, _ = pad_column(seqs["gaps"], max_len)
    tokens = torch.from_numpy(read_tokens(tokenized).astype(np.int64))
    pool = items[items > 0]
    return Corpus(seqs["user_id"].to_list(), items, gaps, lengths, tokens, pool)


def _tokenize_report(tokenized: Path) -> dict:
    return verified.read_json(tokenized / "report.json", "tokenize")


def tokenizer_digest(tokenized: Path) -> str:
    """The SentencePiece model's SHA-256 as tokenized/report.json records it, after checking
    spm.model and the report against tokenized/manifest.json (HashMismatch otherwise)."""
    digest = _tokenize_report(tokenized)["spm_sha256"]
    verified.verify(tokenized / "spm.model", "tokenize")
    return digest


def read_tokens(tokenized: Path) -> np.ndarray:
    """tokens.npy ((N + 1, T) int32), checked against tokenized/manifest.json, and its shape
    (items + 1, max_tokens) and token range [0, vocab_size) against tokenized/report.json
    (a manifest rewritten by hand may pass the first check). The errors name the file and the
    stage to rerun."""
    report = _tokenize_report(tokenized)
    path = tokenized / "tokens.npy"
    tokens = verified.load_npy(path, "tokenize")
    where = tokenized / "report.json"
    shape = (int(report["items"]) + 1, int(report["max_tokens"]))
    if tokens.ndim != 2 or tokens.shape != shape or tokens.dtype.kind not in "iu":
        raise HashMismatch(
            f"{path}: {tokens.dtype} {tokens.shape} is not the int ({shape[0]}, {shape[1]}) "
            f"matrix {where} describes; {verified.fix('tokenize')}"
        )
    if tokens.size and (tokens.min() < 0 or tokens.max() >= int(report["vocab_size"])):
        raise HashMismatch(
            f"{path}: token ids outside [0, {report['vocab_size']}) of the tokenizer in "
            f"{where}; {verified.fix('tokenize')}"
        )
    return tokens


def item_texts(prepared: Path) -> list[str]:
    """Texts of the prepared item table in item-id order (texts[i - 1] = item i)."""
    items = verified.read_parquet(prepared / "items.parquet", "prepare", ["item_id", "text"])
    items = items.sort("item_id")
    ids = items["item_id"].to_numpy()
    if not np.array_equal(ids, np.arange(1, len(ids) + 1)):
        raise ValueError(f"{prepared / 'items.parquet'}: item_id must be 1..N without gaps")
    return items["text"].to_list()


def recency_positions(lengths: np.ndarray, max_len: int) -> np.ndarray:
    """(B, L) recency rank: len - 1 - i for real positions (0 = most recent), 0 for pads."""
    idx = np.arange(max_len)[None, :]
    pos = lengths[:, None] - 1 - idx
    return np.where(pos >= 0, pos, 0)


def bucketed_order(
    lengths: np.ndarray, batch_size: int, rng: np.random.Generator, pool_batches: int = 16
) -> np.ndarray:
    """A permutation of range(len(lengths)) whose consecutive `batch_size` chunks hold
    sequences of similar length, so each batch pads only to its own longest sequence.

    Random permutation, then within pools of `pool_batches` batches a stable sort by length,
    cut into batches, and the full batches shuffled (the one partial batch stays last, so the
    chunks of the returned order are the batches). Attention costs O(L^2) per sequence and
    behavior logs are long-tailed (synthetic default: median 18, max 100), so this is most of
    the pre-training and fine-tuning speed-up; the randomness of the batches' composition is
    kept within each pool (the standard bucket iterator)."""
    n = len(lengths)
    perm = rng.permutation(n)
    pool = max(batch_size * pool_batches, batch_size)
    parts = [
        chunk[np.argsort(lengths[chunk], kind="stable")]
        for chunk in (perm[i : i + pool] for i in range(0, n, pool))
    ]
    ordered = np.concatenate(parts) if parts else perm
    full = n // batch_size
    batches = ordered[: full * batch_size].reshape(full, batch_size)
    batches = batches[rng.permutation(full)]
    return np.concatenate([batches.reshape(-1), ordered[full * batch_size :]])
