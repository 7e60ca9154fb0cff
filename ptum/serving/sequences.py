"""Model inputs from a behavior log, built as prepare + pretrain build them (NumPy, no torch).

The log is validated and each user's sequence cut by prepare's own code
(`ptum.data.prepare.validate`, `ptum.data.prepare.views`): the same rows are refused, the same
exact duplicate events dropped (or refused, with on_duplicates=error), the same order kept.

    order       by (timestamp, line) per user; the last max_behaviors are kept
    gaps        seconds since the user's previous behavior (0 for the first), computed before
                truncation, bucketed floor(log2(gap + 1)) clamped to [0, 31]
    positions   recency rank, 0 = most recent
    tokens      SentencePiece ids of the stripped text (the exported spm.model), first max_tokens
    item_ids    hybrid behavior encoder only: the text's id in the exported id_vocab.json
                (texts[i] -> i + 2); a text it does not hold (rare in pre-training, or new) gets
                the shared UNKNOWN id 1, so a new item is its text vector plus the unknown vector

This module must never import torch (nor a ptum module that does): `ptum embed` runs without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from ptum.data import bad_rows, generic
from ptum.data.errors import DataError
from ptum.data.prepare import views
from ptum.data.prepare.sources import Source
from ptum.data.prepare.validate import DUPLICATE, DUPLICATE_ADVICE, check_rows, first_refused
from ptum.tokenize import PAD_ID

NUM_GAP_BUCKETS = 32
PAD_ID_ROW, UNKNOWN_ID = 0, 1  # ptum.models.behavior.PAD_ROW / UNKNOWN_ROW (no torch import here)
_THRESHOLDS = 2 ** np.arange(1, NUM_GAP_BUCKETS, dtype=np.int64)  # 2, 4, ..., 2^31


def gap_buckets(gaps: np.ndarray) -> np.ndarray:
    """floor(log2(gap + 1)) clamped to [0, 31], integer-exact (NumPy twin of
    `ptum.models.layers.time_gap_bucket`): counts the powers of two 2..2^31 not above gap + 1.
    Negative gaps land in bucket 0."""
    x = np.clip(np.asarray(gaps, dtype=np.int64), 0, 2**62) + 1
    return np.searchsorted(_THRESHOLDS, x, side="right").astype(np.int64)


@dataclass(frozen=True)
class Behaviors:
    """A validated behavior log as `prepare` holds it: integer codes, strings once each.

    frame: line, timestamp, user (position in `users`), item_id (1 + position in `texts`), one
    row per kept behavior. users, texts: the distinct user ids and texts, sorted. rows_dropped:
    rows dropped per reason (duplicate events, with on_duplicates=drop).
    """

    frame: pl.DataFrame
    users: pl.Series
    texts: pl.Series
    rows_dropped: dict[str, int]


def read_behaviors(path: Path, *, on_duplicates: str = "drop") -> Behaviors:
    """The behaviors of `path` checked by prepare's own code (`check_rows`): a DataError at the
    first bad row, as `prepare` with on_bad_rows=error; exact duplicate events are dropped and
    counted (on_duplicates=drop, prepare's default) or stop the run (error). Blank lines are
    skipped."""
    lf, _ = generic.scan(path, "behaviors")
    good, counts, bad, codes = check_rows(
        lf, Source(path, path), "behaviors", good_columns=["line", "timestamp"]
    )
    dropped = counts["rows_dropped"]
    first = first_refused(bad, "error", on_duplicates)
    if first.height:
        # Embed has no quarantine: the only advice is for duplicate events.
        advice = DUPLICATE_ADVICE if first["reason"][0] == DUPLICATE else None
        bad_rows.raise_first(first, path, dropped, advice=advice)
    if good.height == 0:
        raise DataError(path, None, "no valid rows", "row" if path.suffix == ".parquet" else "line")
    (user_codes, users), (text_codes, texts) = codes["user_id"], codes["text"]
    frame = good.select("line", "timestamp").with_columns(
        user=pl.Series(user_codes, dtype=pl.UInt32), item_id=pl.Series(text_codes + 1)
    )
    return Behaviors(frame=frame, users=users, texts=texts, rows_dropped=dropped)


@dataclass(frozen=True)
class Sequences:
    """Every user's kept behaviors as flat arrays (rows grouped by user, oldest first).

    user_ids: (U,) sorted (a Series: no Python object per user); offsets: (U + 1,) row range
    of each user; texts: distinct texts,
    item i + 1 = texts[i] (0 = padding); items, gaps, positions: (R,) per kept behavior;
    n_total: (U,) behaviors before truncation.
    """

    user_ids: pl.Series
    offsets: np.ndarray
    texts: list[str]
    items: np.ndarray
    gaps: np.ndarray
    positions: np.ndarray
    n_total: np.ndarray


def user_sequences(behaviors: Behaviors, max_behaviors: int) -> Sequences:
    """Every user's sequence, built by prepare's own code: the `full` view of
    `ptum.data.prepare.views` (time order, the last max_behaviors, gaps before truncation)
    for every user, with recency positions as pre-training computes them (0 = most recent)."""
    ts, item, n_rows = views.timelines(behaviors.frame, len(behaviors.users))
    k = views.kept_rows(n_rows, ts, n_rows, max_behaviors)
    kept = np.diff(k.offsets)  # (U,): every user has a behavior
    return Sequences(
        user_ids=behaviors.users,
        offsets=k.offsets,
        texts=behaviors.texts.to_list(),
        items=item[k.rows].astype(np.int64),
        gaps=k.gaps.astype(np.int64),
        positions=np.repeat(k.offsets[1:], kept) - 1 - np.arange(k.offsets[-1]),
        n_total=n_rows,
    )


def text_ids(texts: list[str], vocab_texts: list[str]) -> np.ndarray:
    """(len(texts) + 1,) int64: the exported id of each log item (0 = padding item), i.e.
    i + 2 where texts[j] == vocab_texts[i], UNKNOWN_ID where the vocabulary lacks the text."""
    vocab = pl.DataFrame({"text": vocab_texts, "id": np.arange(2, len(vocab_texts) + 2)})
    found = (
        pl.DataFrame({"text": texts})
        .with_row_index("j")
        .join(vocab, on="text", how="left")
        .sort("j")  # joins do not promise row order
    )
    ids = found["id"].fill_null(UNKNOWN_ID).to_numpy().astype(np.int64)
    return np.concatenate([[PAD_ID_ROW], ids]).astype(np.int64)


def batch_inputs(
    seqs: Sequences,
    token_matrix: np.ndarray,
    token_lengths: np.ndarray,
    lo: int,
    hi: int,
    *,
    max_behaviors: int | None,
    max_tokens: int | None,
    item_ids: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Model inputs for users lo..hi-1, right-padded.

    max_behaviors / max_tokens: pad L / T to this size (a static dim of the export), or None to
    pad to the batch's longest.
    item_ids: (len(texts) + 1,) the exported id of each log item (`text_ids`), for a hybrid
    encoder's export; None for the others.

    Returns tokens (B, L, T) int64, token_mask (B, L, T) bool, mask (B, L) bool,
    positions (B, L) int64, gap_buckets (B, L) int64, and with `item_ids` item_ids (B, L) int64.
    """
    r0, r1 = seqs.offsets[lo], seqs.offsets[hi]
    lengths = np.diff(seqs.offsets[lo : hi + 1])  # (B,)
    B = hi - lo
    L = max_behaviors or max(int(lengths.max()), 1)
    owner = np.repeat(np.arange(B), lengths)  # (R,)
    slot = np.arange(r1 - r0) - (seqs.offsets[lo:hi] - r0)[owner]  # index within the user
    items = np.zeros((B, L), dtype=np.int64)
    items[owner, slot] = seqs.items[r0:r1]
    positions = np.zeros((B, L), dtype=np.int64)
    positions[owner, slot] = seqs.positions[r0:r1]
    buckets = np.zeros((B, L), dtype=np.int64)
    buckets[owner, slot] = gap_buckets(seqs.gaps[r0:r1])
    T = max_tokens or max(int(token_lengths[items].max()), 1)
    tokens = token_matrix[items][..., :T].astype(np.int64)  # (B, L, T); item 0 = all pad
    out = dict(
        tokens=tokens,
        token_mask=tokens != PAD_ID,
        mask=np.arange(L) < lengths[:, None],
        positions=positions,
        gap_buckets=buckets,
    )
    if item_ids is not None:
        out["item_ids"] = item_ids[items]  # (B, L); item 0 -> padding id 0
    return out


def call_ranges(
    seqs: Sequences,
    token_lengths: np.ndarray,
    *,
    batch_size: int,
    max_token_slots: int,
    max_behaviors: int | None,
    max_tokens: int | None,
) -> list[tuple[int, int]]:
    """User ranges [lo, hi) of the model calls: consecutive users, at most `batch_size` each,
    and at most `max_token_slots` padded token slots (users x L x T as `batch_inputs` pads them)
    unless one user alone needs more. Memory of an onnxruntime call grows with its slots, so
    this bounds it whatever the users' lengths.

    max_behaviors / max_tokens: the static L / T of the export, or None where the dim is dynamic
    (padded to the call's longest, as in `batch_inputs`).
    """
    lengths = np.diff(seqs.offsets)  # (U,)
    if max_behaviors is not None:
        rows = np.full(len(lengths), max_behaviors)
    else:
        rows = np.maximum(lengths, 1)
    if max_tokens is not None:
        width = np.full(len(lengths), max_tokens)
    else:
        item_len = token_lengths[seqs.items] if len(seqs.items) else np.zeros(0, np.int64)
        width = np.ones(len(lengths), dtype=np.int64)  # an empty user pads to T = 1
        has = lengths > 0
        if has.any():
            width[has] = np.maximum(np.maximum.reduceat(item_len, seqs.offsets[:-1][has]), 1)
    ranges, lo, top_l, top_t = [], 0, 0, 0
    for u in range(len(lengths)):
        new_l, new_t = max(top_l, int(rows[u])), max(top_t, int(width[u]))
        if u > lo and ((u - lo + 1) * new_l * new_t > max_token_slots or u - lo == batch_size):
            ranges.append((lo, u))
            lo, new_l, new_t = u, int(rows[u]), int(width[u])
        top_l, top_t = new_l, new_t
    if len(lengths):
        ranges.append((lo, len(lengths)))
    return ranges
