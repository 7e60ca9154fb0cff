"""Pre-training data: padded user sequences and seeded MBP / NBP sample construction.

Everything here is vectorised over the batch with NumPy (no Python loop over behaviors). A batch
is built for the *global* batch from a generator seeded by (seed, epoch, step), so the samples of
a step are the same whether one process or several data-parallel processes consume it, and a
resumed run rebuilds exactly the batches it would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ptum.data.corpus import Corpus, recency_positions
from ptum.models.layers import time_gap_bucket


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
