"""Pre-training data: padded user sequences and seeded MBP / NBP sample construction.

Everything here is vectorised over the batch with NumPy (no Python loop over behaviors). A batch
is built for the *global* batch from a generator seeded by (seed, epoch, step), so the samples of
a step are the same whether one process or several data-parallel processes consume it, and a
resumed run rebuilds exactly the batches it would have seen.
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
from ptum.models.layers import time_gap_bucket


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


def pad_sequences(lists: list[list[int]], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad (keeping the last max_len of each) -> ((U, max_len) int64, lengths (U,))."""
    out = np.zeros((len(lists), max_len), dtype=np.int64)
    lengths = np.zeros(len(lists), dtype=np.int64)
    for i, seq in enumerate(lists):
        seq = seq[-max_len:]
        out[i, : len(seq)] = seq
        lengths[i] = len(seq)
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
    items, lengths = pad_sequences(seqs["item_ids"].to_list(), max_len)
    gaps, _ = pad_sequences(seqs["gaps"].to_list(), max_len)
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


@dataclass
class Batch:
    """Tensors of one pre-training step (B users). Candidate index 0 is always the positive."""

    items: torch.Tensor  # (B, L) full sequences (MBP input)
    mask: torch.Tensor  # (B, L) bool
    positions: torch.Tensor  # (B, L) recency rank
    gap_buckets: torch.Tensor  # (B, L)
    mbp_mask: torch.Tensor  # (B, L) bool, exactly one True per row
    mbp_cands: torch.Tensor  # (B, 1 + P) item ids
    mbp_valid: torch.Tensor  # (B, 1 + P) bool (False: no valid negative could be drawn)
    past_items: torch.Tensor  # (B, L) behaviors before the NBP cut (NBP input)
    past_mask: torch.Tensor  # (B, L)
    past_positions: torch.Tensor  # (B, L)
    nbp_cands: torch.Tensor  # (B, K, 1 + P)
    nbp_valid: torch.Tensor  # (B, K, 1 + P)
    nbp_target_valid: torch.Tensor  # (B, K) bool: the k-th next behavior exists

    def shard(self, rank: int, world: int) -> Batch:
        """Rows rank, rank + world, ... (the data-parallel slice of this global batch)."""
        return Batch(**{k: v[rank::world] for k, v in self.__dict__.items()})

    def to(self, device: torch.device) -> Batch:
        return Batch(**{k: v.to(device, non_blocking=True) for k, v in self.__dict__.items()})


def recency_positions(lengths: np.ndarray, max_len: int) -> np.ndarray:
    """(B, L) recency rank: len - 1 - i for real positions (0 = most recent), 0 for pads."""
    idx = np.arange(max_len)[None, :]
    pos = lengths[:, None] - 1 - idx
    return np.where(pos >= 0, pos, 0)


def sample_negatives(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    history: np.ndarray,
    pool: np.ndarray,
    num_items: int,
    mode: str,
    max_rounds: int = 20,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw negatives of shape (B, ...) that never appear in the user's own history.

    history: (B, L) item ids (0 = pad, never drawn). mode "popularity": a random behavior of the
    corpus (so popular items are drawn more often, as in the paper); "uniform": any item.
    Returns (negatives, valid); a draw that still collides after max_rounds is marked invalid.
    """

    def draw(n: int) -> np.ndarray:
        if mode == "popularity":
            return pool[rng.integers(0, len(pool), size=n)]
        return rng.integers(1, num_items + 1, size=n)

    b = shape[0]
    neg = draw(int(np.prod(shape))).reshape(shape)
    flat = neg.reshape(b, -1)
    for _ in range(max_rounds):
        bad = (flat[:, :, None] == history[:, None, :]).any(-1)
        if not bad.any():
            break
        flat[bad] = draw(int(bad.sum()))
    bad = (flat[:, :, None] == history[:, None, :]).any(-1)
    return flat.reshape(shape), ~bad.reshape(shape)


def make_batch(
    corpus: Corpus, rows: np.ndarray, rng: np.random.Generator, *, k: int, p: int, negatives: str
) -> Batch:
    """Build MBP and NBP samples for the users at `rows` (all with length >= 2)."""
    lengths = corpus.lengths[rows]
    # Padding columns past the batch's longest sequence are masked everywhere: dropping them
    # changes no value of the batch but the cost of attention over (B, L, L).
    width = max(int(lengths.max()) if len(rows) else 1, 1)
    items = corpus.items[rows, :width]
    gaps = corpus.gaps[rows, :width]
    b, max_len = items.shape
    idx = np.arange(max_len)[None, :]
    mask = idx < lengths[:, None]
    positions = recency_positions(lengths, max_len)
    # MBP: mask exactly one real behavior per user.
    m = (rng.random(b) * lengths).astype(np.int64)
    mbp_mask = idx == m[:, None]
    mbp_pos = items[np.arange(b), m]
    mbp_neg, mbp_ok = sample_negatives(rng, (b, p), items, corpus.pool, corpus.num_items, negatives)
    # NBP: cut at t in [1, len - 1]; the model sees items[:t], predicts items[t : t + K].
    t = 1 + (rng.random(b) * (lengths - 1)).astype(np.int64)
    past_mask = idx < t[:, None]
    past_items = np.where(past_mask, items, 0)
    target_idx = t[:, None] + np.arange(k)[None, :]  # (B, K)
    target_ok = target_idx < lengths[:, None]
    targets = np.take_along_axis(items, np.minimum(target_idx, max_len - 1), axis=1)
    targets = np.where(target_ok, targets, 0)
    nbp_neg, nbp_ok = sample_negatives(
        rng, (b, k, p), items, corpus.pool, corpus.num_items, negatives
    )
    ones = np.ones((b, 1), dtype=bool)
    t_ = torch.from_numpy
    return Batch(
        items=t_(items),
        mask=t_(mask),
        positions=t_(positions),
        gap_buckets=time_gap_bucket(t_(gaps)),
        mbp_mask=t_(mbp_mask),
        mbp_cands=t_(np.concatenate([mbp_pos[:, None], mbp_neg], axis=1)),
        mbp_valid=t_(np.concatenate([ones, mbp_ok], axis=1)),
        past_items=t_(past_items),
        past_mask=t_(past_mask),
        past_positions=t_(recency_positions(t, max_len)),
        nbp_cands=t_(np.concatenate([targets[:, :, None], nbp_neg], axis=2)),
        nbp_valid=t_(np.concatenate([np.ones((b, k, 1), dtype=bool), nbp_ok], axis=2)),
        nbp_target_valid=t_(target_ok),
    )


def step_rng(seed: int, epoch: int, step: int) -> np.random.Generator:
    """The generator of one step: a pure function of (seed, epoch, step)."""
    return np.random.default_rng([seed, epoch, step])


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
