"""The sequence views of `sequences.parquet`: per user, time-ordered, the last `max_behaviors`
kept, with the gap in seconds to the previous behavior (see the package docstring for the three
views). Cut with NumPy from each user's timeline (rows sorted by user, time, line), so no view
sorts the log again."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

VIEWS = ("full", "before_test", "before_train")
SEQUENCE_ROW_GROUP = 16_384  # rows of sequences.parquet per row group
SEQUENCE_SCHEMA = {
    "user_id": pl.String(),
    "view": pl.String(),
    "item_ids": pl.List(pl.Int32),
    "timestamps": pl.List(pl.Int64),
    "gaps": pl.List(pl.Int64),
    "n_total": pl.UInt32(),
}


def sequences(
    behaviors: pl.DataFrame,
    users: pl.Series,
    cut: pl.DataFrame,
    labeled: np.ndarray,
    max_behaviors: int,
) -> pl.DataFrame:
    """Per-user time-ordered views (see the package docstring), truncated to the last max_behaviors.

    behaviors: user (0..U-1, position in `users`), timestamp, line (orders same-second events),
    item_id. users: (U,) sorted user ids. cut: (U,) rows in user order, t_train and t_test
    (null = no such window for that user). labeled: (U,) bool.
    Returns user_id, view, item_ids, timestamps, gaps, n_total, sorted by (view, user_id).
    """
    ts, item, n_rows = timelines(behaviors, len(users))
    totals = view_totals(ts, n_rows, cut, labeled)
    return pl.concat(
        [
            view_rows(view, users, totals[view], ts, item, n_rows, max_behaviors)
            for view in sorted(VIEWS)
        ]
    )


def timelines(behaviors: pl.DataFrame, n_users: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(timestamps (N,), item ids (N,), rows per user (U,)) of `behaviors` (user, timestamp,
    line, item_id) sorted by (user, timestamp, line): each user's rows in time order.

    One sort, skipped when the rows already are in that order; the views are then cut straight
    from these arrays, where a group_by per view would sort each group again.
    """
    df = behaviors.select("user", "timestamp", "line", "item_id")
    owner = df["user"].to_numpy()
    ts = df["timestamp"].to_numpy()
    line = df["line"].to_numpy()
    same = owner[1:] == owner[:-1]
    same_ts = same & (ts[1:] == ts[:-1])
    in_order = (
        (owner[1:] >= owner[:-1]).all()
        and (ts[1:] >= ts[:-1])[same].all()
        and (line[1:] > line[:-1])[same_ts].all()
    )
    if not in_order:
        df = df.sort("user", "timestamp", "line")
        owner = df["user"].to_numpy()
        ts = df["timestamp"].to_numpy()
    n_rows = np.bincount(owner, minlength=n_users)
    if not n_rows.all():
        raise ValueError("sequences: every user in `users` needs at least one behavior")
    return ts, df["item_id"].to_numpy(), n_rows


def view_totals(
    ts: np.ndarray, n_rows: np.ndarray, cut: pl.DataFrame, labeled: np.ndarray
) -> dict[str, np.ndarray]:
    """Each view's (U,) behaviors per user before truncation (n_total), from the users' time
    ordered timestamps (see timelines), cut-offs and labeled flags (see sequences)."""
    starts = np.cumsum(n_rows) - n_rows
    has_train, has_test = (cut[c].is_not_null().to_numpy() for c in ("t_train", "t_test"))
    t_train, t_test = (cut[c].fill_null(0).to_numpy() for c in ("t_train", "t_test"))
    owner = np.repeat(np.arange(len(n_rows), dtype=np.int64), n_rows)
    before = _count_before(owner, ts, starts)  # consumes owner
    return {
        "before_test": np.where(has_test, before(t_test), n_rows),
        "before_train": np.where(has_train, before(t_train), 0),
        "full": np.where(labeled, n_rows, 0),
    }


def view_rows(
    view: str,
    users: pl.Series,
    n_total: np.ndarray,
    ts: np.ndarray,
    item: np.ndarray,
    n_rows: np.ndarray,
    max_behaviors: int,
) -> pl.DataFrame:
    """The rows of one view: each user's first n_total behaviors (rows are time-ordered within
    a user, see timelines), the last max_behaviors of them kept; users with none left out.
    ts and item may be memory-mapped: only the kept rows are read."""
    k = kept_rows(n_total, ts, n_rows, max_behaviors)
    return pl.DataFrame(
        {
            "user_id": users.filter(pl.Series(k.present)),
            "view": pl.Series([view] * (len(k.offsets) - 1), dtype=pl.String),
            "item_ids": _lists(k.offsets, item[k.rows]),
            "timestamps": _lists(k.offsets, k.timestamps),
            "gaps": _lists(k.offsets, k.gaps),
            "n_total": n_total[k.present].astype(np.uint32),
        }
    )


@dataclass(frozen=True)
class Kept:
    """What a view keeps of the users' timelines (`kept_rows`). P users have a behavior in the
    view, R behaviors are kept, user p's in rows offsets[p]:offsets[p + 1], oldest first."""

    present: np.ndarray  # (U,) bool: the user has a behavior in the view
    offsets: np.ndarray  # (P + 1,) int64
    rows: np.ndarray  # (R,) int64: rows of the timelines
    timestamps: np.ndarray  # (R,)
    gaps: np.ndarray  # (R,) seconds since the user's previous behavior, 0 for the first


def kept_rows(n_total: np.ndarray, ts: np.ndarray, n_rows: np.ndarray, max_behaviors: int) -> Kept:
    """Of each user's first n_total (U,) behaviors, the last max_behaviors: the one sequence
    rule of prepare's views and of `ptum embed` (n_total = n_rows, every behavior).

    ts: (N,) the users' timelines (`timelines`), n_rows (U,) behaviors each. Gaps are taken
    before truncation, so the first kept gap is true.
    """
    present = n_total > 0
    kept = np.minimum(n_total, max_behaviors)[present]
    offsets = np.zeros(len(kept) + 1, dtype=np.int64)
    np.cumsum(kept, out=offsets[1:])
    starts = (np.cumsum(n_rows) - n_rows)[present]
    first_kept = starts + n_total[present] - kept
    rows = np.repeat(first_kept - offsets[:-1], kept) + np.arange(offsets[-1])
    kept_ts = ts[rows]
    # Gap to the previous behavior, truncated away or not; 0 for a user's first behavior.
    gap = kept_ts - ts[np.maximum(rows - 1, 0)]
    gap[offsets[:-1][first_kept == starts]] = 0
    return Kept(present=present, offsets=offsets, rows=rows, timestamps=kept_ts, gaps=gap)


def _count_before(owner: np.ndarray, ts: np.ndarray, starts: np.ndarray):
    """A function cutoff (U,) -> (U,) number of each user's rows with timestamp < cutoff.

    owner, ts: (N,) int64 rows sorted by (owner, ts); starts: (U,) each user's first row.
    Binary search on one (owner, time) key when it fits in 63 bits, so no (N,) temporary per
    call; a per-row comparison otherwise. The key is built in owner's memory (fresh pages are
    slow to fault in on large logs): owner must not be used afterwards.
    """
    t0, t1 = int(ts.min()), int(ts.max())
    span = t1 - t0 + 2
    if len(starts) * span < 2**62:
        key = owner
        key *= span
        key += ts
        key -= t0

        def before(cutoff: np.ndarray) -> np.ndarray:
            local = np.clip(cutoff - t0, 0, span - 1)  # all rows lie in [0, span - 2]
            return np.searchsorted(key, np.arange(len(starts)) * span + local) - starts
    else:

        def before(cutoff: np.ndarray) -> np.ndarray:
            return np.add.reduceat(ts < cutoff[owner], starts, dtype=np.int64)

    return before


def _lists(offsets: np.ndarray, values: np.ndarray) -> pl.Series:
    """A list Series whose row i is values[offsets[i]:offsets[i + 1]]."""
    return pl.Series(
        _ArrowCArray(pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values)))
    )


class _ArrowCArray:
    """A pyarrow array seen only through the Arrow PyCapsule interface. Polars takes it over
    without copying, as from a pyarrow array, but without importing pyarrow.compute first
    (about 0.1 s, paid by every fresh process)."""

    def __init__(self, array: pa.Array) -> None:
        self.array = array

    def __arrow_c_array__(self, requested_schema: object | None = None) -> tuple[object, object]:
        return self.array.__arrow_c_array__(requested_schema)
