"""Stage `prepare`: validate the generic tables, build the item table, user sequences and splits.

Outputs (in `out_dir`):
    items.parquet        item_id i32 (1..N; 0 is the padding item), text, n_behaviors
    sequences.parquet    user_id, view, item_ids list[i32], timestamps list[i64], gaps list[i64],
                         n_total (behaviors in the view before truncation to max_behaviors)
    users.parquet        user_id, n_behaviors, pretrain_split ("train" | "valid" | null)
    labels.parquet       user_id, <label columns>, split ("train"|"valid"|"test"), train_<r>...
    impressions.parquet  user_id, timestamp, item_id, clicked, window ("train"|"valid"|"test"),
                         train_<r>... (nested training subsets of the train window)
    report.json          the data report (rows read = kept + dropped per reason, always)
    quarantine/<table>.parquet   bad rows with their line and reason (quarantine mode only)

Sequence views (each time-ordered, the last `max_behaviors` kept, gaps = seconds since the
previous behavior, computed before truncation so the first kept gap is true):
    full          every behavior of a labeled user: the input of the demographic tasks
    before_test   behaviors strictly before the user's CTR-test window: the pre-training corpus
                  of every user, and the history of CTR-test impressions
    before_train  behaviors strictly before the CTR-train window: history of CTR-train/valid

So the pre-training corpus never contains a test impression (nor, for MovieLens, where ratings are
both behaviors and impressions, the test ratings themselves) and never any label.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
from polars.io.plugins import register_io_source

from ptum.data import generic
from ptum.data.errors import DataError

VIEWS = ("full", "before_test", "before_train")


@dataclass(frozen=True)
class PrepareOptions:
    """Explicit arguments of `prepare` (the CLI builds them from params.yaml)."""

    max_behaviors: int = 100
    on_bad_rows: str = "error"
    ctr_windows: str = "global"
    ctr_train_frac: float = 0.1
    ctr_test_frac: float = 0.1
    ctr_valid_frac: float = 0.1
    demo_split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    label_ratios: tuple[float, ...] = (0.2, 0.5, 1.0)
    pretrain_valid_frac: float = 0.05
    seed: int = 13
    chunk_rows: int = 4_000_000

    def __post_init__(self) -> None:
        if self.max_behaviors < 2:
            raise ValueError("prepare.max_behaviors must be >= 2")
        if self.chunk_rows < 1:
            raise ValueError(f"prepare.chunk_rows must be >= 1, got {self.chunk_rows}")
        if self.ctr_windows != "global":
            raise ValueError(
                f"prepare.ctr_windows={self.ctr_windows!r} is refused: per-user windows put "
                "impressions (and pre-training behaviors) that are later than other users' test "
                "impressions into training, so the test window is no longer the future; set "
                "prepare.ctr_windows: global"
            )
        if abs(sum(self.demo_split) - 1.0) > 1e-6 or min(self.demo_split) < 0:
            raise ValueError(
                f"prepare.demo_split must be 3 shares summing to 1, got {self.demo_split}"
            )
        if not all(0 < r <= 1 for r in self.label_ratios):
            raise ValueError(f"prepare.label_ratios must lie in (0, 1], got {self.label_ratios}")
        if not (
            0 < self.ctr_test_frac < 1
            and 0 < self.ctr_train_frac < 1
            and self.ctr_train_frac + self.ctr_test_frac <= 1
        ):
            raise ValueError(
                "prepare.ctr_train_frac and ctr_test_frac must be in (0, 1) and sum <= 1"
            )


SEQUENCE_ROW_GROUP = 16_384  # rows of sequences.parquet per row group
SEQUENCE_SCHEMA = {
    "user_id": pl.String,
    "view": pl.String,
    "item_ids": pl.List(pl.Int32),
    "timestamps": pl.List(pl.Int64),
    "gaps": pl.List(pl.Int64),
    "n_total": pl.UInt32,
}
# Order of the CTR impressions when they get their windows and their train/valid draw.
WINDOW_ORDER = ("timestamp", "user_id", "item_id", "line")


def ratio_column(r: float) -> str:
    """Column name of the nested training subset with ratio r (0.2 -> 'train_20')."""
    return f"train_{round(r * 100)}"


# ---------------------------------------------------------------- validation


def _codes(s: pl.Series) -> tuple[np.ndarray, pl.Series]:
    """(codes, distinct values) of a Categorical Series: the distinct non-null values sorted,
    code = position in them; nulls get code -1.

    Every later step (duplicates, item ids, user order) works on these integers; the strings
    themselves are only touched once per distinct value.
    """
    distinct = s.unique().drop_nulls()
    ids = distinct.to_physical().cast(pl.Int64).to_numpy()
    values = distinct.cast(pl.String)
    order = values.arg_sort().to_numpy()
    null_id = int(ids.max()) + 1 if len(ids) else 0
    rank = np.full(null_id + 1, -1, dtype=np.int32)  # int32: half the memory of int64
    rank[ids[order]] = np.arange(len(order))
    physical = s.to_physical().fill_null(null_id).to_numpy()
    return rank[physical], values.gather(order).rename(s.name)


def _validate(
    path: Path,
    table: str,
    opts: PrepareOptions,
    quarantine_dir: Path,
    known_users: pl.Enum | None = None,
    good_columns: list[str] | None = None,
) -> tuple[pl.DataFrame, dict, list[str], dict[str, tuple[np.ndarray, pl.Series]]]:
    """Validate one whole table in memory. Raises or quarantines.

    Returns (good rows sorted by line, counts, label columns, codes): codes maps user_id and
    text to `_codes` of the good rows' values (text absent for labels). good_columns: the
    columns of the good rows to return (default all), so a caller that only needs the codes
    does not copy the strings.
    """
    lf, label_cols = generic.scan(path, table)
    good, counts, bad, codes = _check(lf, path, table, known_users, good_columns)
    _settle(path, table, opts, quarantine_dir, [(counts, bad)])
    if good.height == 0 and table != "impressions":
        raise DataError(path, None, "no valid rows", "row" if path.suffix == ".parquet" else "line")
    return good, counts, label_cols, codes


def _check(
    lf: pl.LazyFrame,
    path: Path,
    table: str,
    known_users: pl.Enum | None = None,
    good_columns: list[str] | None = None,
) -> tuple[pl.DataFrame, dict, pl.DataFrame, dict[str, tuple[np.ndarray, pl.Series]]]:
    """Flag the bad rows of `lf` (the output of `generic.scan`, or a chunk of it holding whole
    users): row checks, duplicates, unknown users. Raises nothing.

    Returns (good rows sorted by line, counts, bad rows sorted by line, codes); see _validate.
    """
    schema = lf.collect_schema()
    columns = schema.names()
    # Long, repetitive strings held as Categorical (chunks from `_partition` come so already):
    # a few bytes a row instead of the text, and hashed while streaming. Cast back to String
    # wherever rows leave this function.
    categorical = [c for c in ("user_id", "text") if c in columns]
    df = lf.with_columns(
        pl.col(c).cast(pl.Categorical) for c in categorical if schema[c] == pl.String
    ).collect(engine="streaming")
    as_string = [pl.col(c).cast(pl.String) for c in categorical]
    user, users = _codes(df["user_id"])
    coded = {"__user": user}
    if table == "labels":
        keys, dup_reason = ["__user"], "duplicate_user"
    else:
        keys, dup_reason = ["__user", "timestamp", "__text"], "duplicate_event"
        coded["__text"], texts = _codes(df["text"])
        if "source_item_id" in columns:
            keys.append("source_item_id")
    df = generic.mark_duplicates(df.with_columns(**coded), keys, dup_reason)
    if known_users is not None:
        # Looked up once per distinct user, not per row.
        known_value = users.cast(known_users, strict=False).is_not_null().to_numpy()
        known = pl.Series(np.append(known_value, False)[user])  # code -1 (null) -> last
        df = df.with_columns(
            reason=pl.when(pl.col("reason").is_null() & ~known)
            .then(pl.lit("unknown_user"))
            .otherwise(pl.col("reason"))
        )
    kept = df["reason"].null_count()
    dropped = {str(k): int(v) for k, v in df["reason"].drop_nulls().value_counts().iter_rows()}
    # Blank lines are not data rows: count them apart so rows_read means data rows.
    blank = dropped.pop("blank_line", 0)
    counts = {
        "file": str(path),
        "rows_read": kept + sum(dropped.values()),
        "rows_kept": kept,
        "rows_dropped": dropped,
        "blank_lines_skipped": blank,
    }
    bad = df.filter(pl.col("reason").is_not_null() & (pl.col("reason") != "blank_line"))
    bad = bad.select(columns).with_columns(as_string).sort("line")
    keep = [c for c in good_columns or columns if c != "reason"]
    good = (
        df.select(*keep, *coded)
        .filter(df["reason"].is_null())
        .sort("line")
        .with_columns(c for c in as_string if c.meta.output_name() in keep)
    )
    del df
    # Re-code among the good rows only: codes 0..n-1 in sorted order of their values.
    codes = {"user_id": _recode(good["__user"].to_numpy(), users)}
    if table != "labels":
        codes["text"] = _recode(good["__text"].to_numpy(), texts)
    return good.drop(list(coded)), counts, bad, codes


def _settle(
    path: Path,
    table: str,
    opts: PrepareOptions,
    quarantine_dir: Path,
    parts: list[tuple[dict, pl.DataFrame]],
) -> dict:
    """Counts and bad rows of a table's chunks -> the table's counts; raises a DataError at the
    first bad row of the whole file (on_bad_rows=error) or writes them to the quarantine."""
    counts = {
        "file": str(path),
        "rows_read": 0,
        "rows_kept": 0,
        "rows_dropped": {},
        "blank_lines_skipped": 0,
    }
    for c, _ in parts:
        for k in ("rows_read", "rows_kept", "blank_lines_skipped"):
            counts[k] += c[k]
        for reason, n in c["rows_dropped"].items():
            counts["rows_dropped"][reason] = counts["rows_dropped"].get(reason, 0) + n
    counts["rows_dropped"] = dict(sorted(counts["rows_dropped"].items()))
    if counts["rows_dropped"]:
        bad = pl.concat([b for _, b in parts if b.height]).sort("line")
        if opts.on_bad_rows == "error":
            generic.raise_first(bad, path, counts["rows_dropped"])
        quarantine_dir.mkdir(parents=True, exist_ok=True)
        bad.write_parquet(quarantine_dir / f"{table}.parquet")
    return counts


def _recode(codes: np.ndarray, values: pl.Series) -> tuple[np.ndarray, pl.Series]:
    """Drop the values no code uses; renumber the codes densely, order kept."""
    used = np.bincount(codes, minlength=len(values)) > 0
    new = (np.cumsum(used) - 1).astype(np.int32)
    return new[codes], values.filter(pl.Series(used))


# ---------------------------------------------------------------- pure transforms


def build_items(
    behavior_texts: pl.Series, impression_texts: pl.Series, behavior_text_codes: np.ndarray
) -> tuple[pl.DataFrame, pl.Enum]:
    """Distinct texts (behaviors and impression candidates) -> item table sorted by text.

    behavior_texts: the distinct behavior texts, sorted; behavior_text_codes: (N,) each
    behavior's position in them. Returns the items (item_id, text, n_behaviors) and an Enum
    whose physical code + 1 is the item_id. item_id is 1-based so that 0 can be the padding
    item; n_behaviors counts behaviors only.
    """
    counts = np.bincount(behavior_text_codes, minlength=len(behavior_texts))
    return item_table(behavior_texts, counts, impression_texts)


def item_table(
    behavior_texts: pl.Series, counts: np.ndarray, impression_texts: pl.Series
) -> tuple[pl.DataFrame, pl.Enum]:
    """build_items from the distinct behavior texts (any order) and their (B,) behavior counts."""
    texts = pl.concat([behavior_texts, impression_texts.unique()]).unique().sort()
    enum = pl.Enum(texts)
    n_behaviors = np.zeros(len(texts), dtype=np.int64)
    n_behaviors[behavior_texts.cast(enum).to_physical().cast(pl.Int64).to_numpy()] = counts
    items = pl.DataFrame(
        {
            "item_id": np.arange(1, len(texts) + 1, dtype=np.int32),
            "text": texts,
            "n_behaviors": n_behaviors,
        }
    )
    return items, enum


def global_cutoffs(
    n: int, kth: Callable[[int], int], train_frac: float, test_frac: float
) -> tuple[int | None, int | None]:
    """(t_train, t_test) of `global` windows over n impressions; kth(k) is the k-th smallest
    timestamp (0-based). The CTR-test window starts at the timestamp of rank n - ceil(n *
    test_frac), the CTR-train window ceil(n * train_frac) ranks earlier."""
    if n == 0:
        return None, None
    return (
        int(kth(max(n - math.ceil(n * (test_frac + train_frac)), 0))),
        int(kth(max(n - math.ceil(n * test_frac), 0))),
    )


def global_windows(
    impressions: pl.DataFrame, t_train: int | None, t_test: int | None
) -> pl.DataFrame:
    """Add `window` from global cut-offs: ties go to the later window (null: no impressions)."""
    if t_test is None:
        return impressions.with_columns(window=pl.lit(None, dtype=pl.String))
    return impressions.with_columns(
        window=pl.when(pl.col("timestamp") >= t_test)
        .then(pl.lit("test"))
        .when(pl.col("timestamp") >= t_train)
        .then(pl.lit("train"))
        .otherwise(pl.lit("history"))
    )


def ctr_cutoffs(
    impressions: pl.DataFrame, train_frac: float, test_frac: float
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Assign each impression a window and return (impressions + window, the cut-offs).

    Windows by global time rank: the last `test_frac` of all impressions are the CTR-test
    window, the `train_frac` before them the CTR-train window, the rest history (not CTR
    samples). One cut-off timestamp for everyone (ties go to the later window), so the test
    window is the future of every user. Cut-offs: one row (t_train, t_test).
    """
    ordered = impressions.sort(*WINDOW_ORDER)
    ts = ordered["timestamp"].to_numpy()
    t_train, t_test = global_cutoffs(ordered.height, ts.__getitem__, train_frac, test_frac)
    cut = pl.DataFrame(
        {"t_train": [t_train], "t_test": [t_test]},
        schema={"t_train": pl.Int64, "t_test": pl.Int64},
    )
    return global_windows(ordered, t_train, t_test), cut


def sequences(
    behaviors: pl.DataFrame,
    users: pl.Series,
    cut: pl.DataFrame,
    labeled: np.ndarray,
    max_behaviors: int,
) -> pl.DataFrame:
    """Per-user time-ordered views (see module docstring), truncated to the last max_behaviors.

    behaviors: user (0..U-1, position in `users`), timestamp, line (orders same-second events),
    item_id. users: (U,) sorted user ids. cut: (U,) rows in user order, t_train and t_test
    (null = no such window for that user). labeled: (U,) bool.
    Returns user_id, view, item_ids, timestamps, gaps, n_total, sorted by (view, user_id).
    """
    ts, item, n_rows = _timelines(behaviors, len(users))
    totals = _view_totals(ts, n_rows, cut, labeled)
    return pl.concat(
        [
            _view_rows(view, users, totals[view], ts, item, n_rows, max_behaviors)
            for view in sorted(VIEWS)
        ]
    )


def _timelines(behaviors: pl.DataFrame, n_users: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def _view_totals(
    ts: np.ndarray, n_rows: np.ndarray, cut: pl.DataFrame, labeled: np.ndarray
) -> dict[str, np.ndarray]:
    """Each view's (U,) behaviors per user before truncation (n_total), from the users' time
    ordered timestamps (see _timelines), cut-offs and labeled flags (see sequences)."""
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


def _view_rows(
    view: str,
    users: pl.Series,
    n_total: np.ndarray,
    ts: np.ndarray,
    item: np.ndarray,
    n_rows: np.ndarray,
    max_behaviors: int,
) -> pl.DataFrame:
    """The rows of one view: each user's first n_total behaviors (rows are time-ordered within
    a user, see _timelines), the last max_behaviors of them kept; users with none left out.
    ts and item may be memory-mapped: only the kept rows are read."""
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
    return pl.DataFrame(
        {
            "user_id": users.filter(pl.Series(present)),
            "view": pl.Series([view] * len(kept), dtype=pl.String),
            "item_ids": _lists(offsets, item[rows]),
            "timestamps": _lists(offsets, kept_ts),
            "gaps": _lists(offsets, gap),
            "n_total": n_total[present].astype(np.uint32),
        }
    )


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


def _shuffled_rank(keys: list[str], seed: int) -> np.ndarray:
    """A seeded random rank (0..n-1) for each key, independent of input order."""
    order = np.argsort(np.asarray(keys, dtype=object), kind="stable")
    perm = np.random.default_rng(seed).permutation(len(keys))
    rank = np.empty(len(keys), dtype=np.int64)
    rank[order] = perm
    return rank


def split_labels(
    labels: pl.DataFrame, split: tuple[float, float, float], ratios: tuple[float, ...], seed: int
) -> pl.DataFrame:
    """Add `split` (train/valid/test by seeded shuffle) and nested `train_<r>` subset flags."""
    n = labels.height
    rank = _shuffled_rank(labels["user_id"].to_list(), seed)
    n_train = int(round(split[0] * n))
    n_valid = int(round(split[1] * n))
    which = np.where(rank < n_train, "train", np.where(rank < n_train + n_valid, "valid", "test"))
    out = labels.with_columns(split=pl.Series(which, dtype=pl.String))
    # Train users ranked 0..n_train-1: the first round(r * n_train) form subset r, so nested.
    flags = {ratio_column(r): (rank < int(round(r * n_train))) for r in ratios}
    return out.with_columns(**{k: pl.Series(v) for k, v in flags.items()})


def split_impressions(
    imps: pl.DataFrame, valid_frac: float, ratios: tuple[float, ...], seed: int
) -> pl.DataFrame:
    """Train-window impressions -> train/valid (seeded, by impression), nested train subsets."""
    is_train = (imps["window"] == "train").to_numpy()
    rng = np.random.default_rng(seed)
    u = rng.random(imps.height)
    n_train_window = int(is_train.sum())
    # Rank train-window impressions by u; the first valid share is validation.
    order = np.argsort(np.where(is_train, u, 2.0), kind="stable")
    rank = np.empty(imps.height, dtype=np.int64)
    rank[order] = np.arange(imps.height)
    n_valid = int(round(valid_frac * n_train_window))
    window = np.where(is_train & (rank < n_valid), "valid", imps["window"].to_numpy())
    n_train = n_train_window - n_valid
    train_rank = rank - n_valid
    out = imps.with_columns(window=pl.Series(window, dtype=pl.String))
    flags = {
        ratio_column(r): (window == "train") & (train_rank < int(round(r * n_train)))
        for r in ratios
    }
    return out.with_columns(**{k: pl.Series(v) for k, v in flags.items()})


def _distribution(values: pl.Series) -> dict[str, float]:
    if values.len() == 0:
        return {}
    q = {
        f"p{int(p * 100)}": float(values.quantile(p, "nearest"))
        for p in (0.1, 0.25, 0.5, 0.75, 0.9)
    }
    return {
        "min": float(values.min()),
        **q,
        "mean": round(float(values.mean()), 3),
        "max": float(values.max()),
    }


# ---------------------------------------------------------------- the stage


@dataclass
class _Core:
    """What both ways of running the stage hand to `_finish` (items and sequences written)."""

    items: pl.DataFrame
    users: pl.Series  # (U,) sorted ids of the users with a valid behavior
    n_behaviors: np.ndarray  # (U,) valid behaviors per user
    before_test: pl.DataFrame  # user_id, n_total of each user's before_test view
    windowed: pl.DataFrame  # CTR-train/test-window impressions in WINDOW_ORDER
    n_history: int  # impressions before the CTR-train window (not CTR samples)
    labels: pl.DataFrame
    label_cols: list[str]


def prepare(raw_dir: Path, out_dir: Path, opts: PrepareOptions) -> dict:
    """Run the whole stage; returns the data report (also written to out_dir/report.json).

    A behaviors table of at most `opts.chunk_rows` rows is processed in memory; a bigger one
    streams through in chunks of whole users (`_chunked`), with the same outputs.
    """
    paths = {t: generic.find_table(raw_dir, t) for t in ("behaviors", "labels", "impressions")}
    if paths["behaviors"] is None:
        raise DataError(raw_dir, None, "no behaviors table (behaviors.parquet or behaviors.tsv)")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    report: dict = {}
    n_chunks = max(1, math.ceil(_row_count(paths["behaviors"]) / opts.chunk_rows))
    if n_chunks == 1:
        core = _in_memory(paths, tmp, opts, report)
    else:
        core = _chunked(paths, tmp, opts, report, n_chunks)
        shutil.rmtree(tmp / "chunks")
    _finish(core, tmp, opts, report)
    # Replace the previous output only once everything is written: no half-written outputs.
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return report


def _row_count(path: Path) -> int:
    """Rows of a Parquet file (from its metadata) or lines of a TSV file."""
    if path.suffix == ".parquet":
        return pl.scan_parquet(path).select(pl.len()).collect().item()
    n = 0
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            n += block.count(b"\n")
    return n


def _no_table() -> dict:
    return {"file": None, "rows_read": 0, "rows_kept": 0, "rows_dropped": {}}


def _labels(
    path: Path | None, opts: PrepareOptions, qdir: Path, user_enum: pl.Enum, report: dict
) -> tuple[pl.DataFrame, list[str]]:
    """The valid labels (user_id, <label columns>) and the label columns."""
    if path is None:
        report["labels"] = _no_table()
        return pl.DataFrame(schema={"user_id": pl.String}), []
    labels, report["labels"], label_cols, _ = _validate(
        path, "labels", opts, qdir, known_users=user_enum
    )
    return labels.drop("line"), label_cols


def _user_cut(users: pl.Series, cut: pl.DataFrame) -> pl.DataFrame:
    """The global cut-offs (t_train, t_test) repeated for each of `users`, in their order.

    Users without impressions are cut at the same instant, so nothing at or after the global
    test window reaches pre-training."""
    return pl.select(user_id=users).join(cut, how="cross")


def _ctr_columns(imps: pl.DataFrame, user_enum: pl.Enum, item_enum: pl.Enum) -> pl.DataFrame:
    """Impressions as (line, user_id Enum, timestamp, item_id, clicked). user_id as the Enum of
    sorted user ids: sorts by it compare integers, in the same order as the strings."""
    return imps.select(
        "line",
        pl.col("user_id").cast(user_enum),
        "timestamp",
        item_id=(pl.col("text").cast(item_enum).to_physical() + 1).cast(pl.Int32),
        clicked="clicked",
    )


_NO_IMPRESSIONS = {
    "line": pl.UInt32,
    "user_id": pl.String,
    "timestamp": pl.Int64,
    "text": pl.String,
    "clicked": pl.Int8,
}


def _in_memory(
    paths: dict[str, Path | None], tmp: Path, opts: PrepareOptions, report: dict
) -> _Core:
    """Validate every table whole, then build the items and sequences."""
    qdir = tmp / "quarantine"
    # Behaviors are needed as codes only (user, item): their strings are not copied.
    behaviors, report["behaviors"], _, codes = _validate(
        paths["behaviors"], "behaviors", opts, qdir, good_columns=["line", "timestamp"]
    )
    user_codes, users = codes["user_id"]
    user_enum = pl.Enum(users)
    if paths["impressions"] is not None:
        imps, report["impressions"], _, _ = _validate(
            paths["impressions"], "impressions", opts, qdir, known_users=user_enum
        )
    else:
        imps, report["impressions"] = pl.DataFrame(schema=_NO_IMPRESSIONS), _no_table()
    labels, label_cols = _labels(paths["labels"], opts, qdir, user_enum, report)

    text_codes, texts = codes["text"]
    items, item_enum = build_items(texts, imps["text"], text_codes)
    items.write_parquet(tmp / "items.parquet")
    item_of_code = texts.cast(item_enum).to_physical().cast(pl.Int32).to_numpy() + 1
    beh = behaviors.select("line", "timestamp").with_columns(
        user=pl.Series(user_codes, dtype=pl.UInt32), item_id=pl.Series(item_of_code[text_codes])
    )
    del behaviors, text_codes
    windowed, cut = ctr_cutoffs(
        _ctr_columns(imps, user_enum, item_enum),
        opts.ctr_train_frac,
        opts.ctr_test_frac,
    )
    labeled = users.is_in(labels["user_id"].implode()).to_numpy()
    seqs = sequences(beh, users, _user_cut(users, cut), labeled, opts.max_behaviors)
    # Row groups of SEQUENCE_ROW_GROUP rows: compressed in parallel and with bounded buffers on
    # big logs. A file with fewer rows is one row group either way, byte-identical to the
    # default writer's (DVC hashes bytes; the committed result sets stay valid).
    seqs.write_parquet(tmp / "sequences.parquet", row_group_size=SEQUENCE_ROW_GROUP)
    return _Core(
        items=items,
        users=users,
        n_behaviors=np.bincount(user_codes, minlength=len(users)),
        before_test=seqs.filter(pl.col("view") == "before_test").select("user_id", "n_total"),
        windowed=windowed.filter(pl.col("window") != "history"),
        n_history=int((windowed["window"] == "history").sum()),
        labels=labels,
        label_cols=label_cols,
    )


def _chunked(
    paths: dict[str, Path | None], tmp: Path, opts: PrepareOptions, report: dict, n_chunks: int
) -> _Core:
    """`_in_memory`'s outputs, holding about 1/n_chunks of the behaviors at a time.

    The behaviors and impressions are first split on disk (one streaming pass each, user ids
    and texts stored as codes) into n_chunks ranges of whole users, in sorted user order and
    of about equal behavior counts. Everything but the global CTR cut-offs, the item table and
    the train/valid draw of CTR samples is per user, so each chunk is validated and ordered
    into timelines (pass 1), then cut into sequences (pass 2) on its own; chunks' sequences
    are concatenated in user order. What stays in memory across chunks: the user ids, the
    distinct texts, per-user counts, the bad rows (one per chunk unless quarantined) and the
    CTR-window impressions (the CTR samples written to impressions.parquet).
    """
    work, qdir = tmp / "chunks", tmp / "quarantine"

    def say(step: str) -> None:
        print(f"prepare: {n_chunks} chunks of whole users: {step}", file=sys.stderr, flush=True)

    say("splitting behaviors and impressions by user range")
    ranges = _user_ranges(paths["behaviors"], n_chunks)
    # The chunk files' user_id and text codes: a mapping of this run's own, kept alive by
    # `codes_in_use` until every chunk is validated.
    categorical = pl.Categorical(pl.Categories.random())
    codes_in_use = pl.Series(dtype=categorical)
    beh_chunks = _partition(
        paths["behaviors"], "behaviors", ranges, work / "behaviors", n_chunks, categorical
    )
    imp_chunks = (
        _partition(
            paths["impressions"], "impressions", ranges, work / "impressions", n_chunks, categorical
        )
        if paths["impressions"] is not None
        else [None] * n_chunks
    )

    def keep_bad(bad: pl.DataFrame) -> pl.DataFrame:
        return bad if opts.on_bad_rows == "quarantine" else bad.head(1)

    # Pass 1: validate each chunk; keep its valid behaviors as integer codes on disk.
    say("validating")
    users_of, n_behaviors, texts_of, text_counts, parts = [], [], [], [], []
    for c, chunk in enumerate(beh_chunks):
        if chunk is None:  # a range emptied by one big user before it
            users_of.append(pl.Series("user_id", [], pl.String))
            n_behaviors.append(np.zeros(0, dtype=np.int64))
            texts_of.append(pl.Series("text", [], pl.String))
            text_counts.append(np.zeros(0, dtype=np.int64))
            continue
        good, counts, bad, codes = _check(
            chunk, paths["behaviors"], "behaviors", good_columns=["line", "timestamp"]
        )
        (user_codes, users_c), (text_codes, texts_c) = codes["user_id"], codes["text"]
        # Time-ordered per user (see _timelines), once here rather than once per view later.
        timeline = good.with_columns(
            user=pl.Series(user_codes, dtype=pl.UInt32), text=pl.Series(text_codes, dtype=pl.UInt32)
        ).sort("user", "timestamp", "line")
        np.save(work / f"ts_{c}.npy", timeline["timestamp"].to_numpy())
        np.save(work / f"text_{c}.npy", timeline["text"].to_numpy())
        del timeline
        users_of.append(users_c)
        n_behaviors.append(np.bincount(user_codes, minlength=len(users_c)))
        texts_of.append(texts_c)
        text_counts.append(np.bincount(text_codes, minlength=len(texts_c)))
        parts.append((counts, keep_bad(bad)))
        del good, codes, user_codes, text_codes
    report["behaviors"] = _settle(paths["behaviors"], "behaviors", opts, qdir, parts)
    if report["behaviors"]["rows_kept"] == 0:
        raise DataError(
            paths["behaviors"],
            None,
            "no valid rows",
            "row" if paths["behaviors"].suffix == ".parquet" else "line",
        )
    users = pl.concat(users_of)  # chunks are consecutive ranges of sorted ids: still sorted
    user_enum = pl.Enum(users)

    imp_texts, stamps, parts = [pl.Series("text", [], pl.String)], [], []
    for c, chunk in enumerate(imp_chunks):
        if chunk is None:
            continue
        good, counts, bad, codes = _check(
            chunk, paths["impressions"], "impressions", known_users=pl.Enum(users_of[c])
        )
        good.write_parquet(work / f"impressions_{c}.parquet", compression="lz4")
        np.save(work / f"timestamps_{c}.npy", np.sort(good["timestamp"].to_numpy()))
        stamps.append(work / f"timestamps_{c}.npy")
        imp_texts.append(codes["text"][1])
        parts.append((counts, keep_bad(bad)))
        del good, codes
    del codes_in_use
    report["impressions"] = (
        _settle(paths["impressions"], "impressions", opts, qdir, parts)
        if paths["impressions"] is not None
        else _no_table()
    )
    labels, label_cols = _labels(paths["labels"], opts, qdir, user_enum, report)

    texts = pl.DataFrame({"text": pl.concat(texts_of), "n": np.concatenate(text_counts)})
    texts = texts.group_by("text").agg(pl.col("n").sum())  # a text may occur in many chunks
    items, item_enum = item_table(texts["text"], texts["n"].to_numpy(), pl.concat(imp_texts))
    items.write_parquet(tmp / "items.parquet")
    del texts, imp_texts
    # Global CTR windows: cut-offs over every chunk's impressions.
    sorted_ts = [np.load(f, mmap_mode="r") for f in stamps]
    t_train, t_test = global_cutoffs(
        sum(len(a) for a in sorted_ts),
        lambda k: _kth_smallest(sorted_ts, k),
        opts.ctr_train_frac,
        opts.ctr_test_frac,
    )
    global_cut = pl.DataFrame(
        {"t_train": [t_train], "t_test": [t_test]},
        schema={"t_train": pl.Int64, "t_test": pl.Int64},
    )

    # Pass 2: CTR windows, cut-offs and view sizes chunk by chunk, then the sequences view by
    # view (the output is sorted by view, then user), each chunk's rows appended to the file as
    # they come, cut from its memory-mapped timelines.
    say("sequences")
    labeled = users.is_in(labels["user_id"].implode()).to_numpy()
    first = np.cumsum([0] + [len(u) for u in users_of])
    totals, windowed, n_history = [], [], 0
    for c, users_c in enumerate(users_of):
        imp_file = work / f"impressions_{c}.parquet"
        imps = (
            pl.read_parquet(imp_file) if imp_file.exists() else pl.DataFrame(schema=_NO_IMPRESSIONS)
        )
        imps = _ctr_columns(imps, user_enum, item_enum)
        win, cut = global_windows(imps, t_train, t_test), global_cut
        windowed.append(win.filter(pl.col("window") != "history"))
        n_history += int((win["window"] == "history").sum())
        del imps, win
        if len(users_c) == 0:
            totals.append({})
            continue
        totals.append(
            _view_totals(
                np.load(work / f"ts_{c}.npy"),
                n_behaviors[c],
                _user_cut(users_c, cut),
                labeled[first[c] : first[c + 1]],
            )
        )
        item_of_code = texts_of[c].cast(item_enum).to_physical().cast(pl.Int32).to_numpy() + 1
        np.save(work / f"item_{c}.npy", item_of_code[np.load(work / f"text_{c}.npy")])

    def chunk_sequences(*_) -> Iterator[pl.DataFrame]:
        for view in sorted(VIEWS):
            for c, users_c in enumerate(users_of):
                if len(users_c) == 0:
                    continue
                yield _view_rows(
                    view,
                    users_c,
                    totals[c][view],
                    np.load(work / f"ts_{c}.npy", mmap_mode="r"),
                    np.load(work / f"item_{c}.npy", mmap_mode="r"),
                    n_behaviors[c],
                    opts.max_behaviors,
                )

    # Polars writes what the generator yields, in order, compressing on its own threads.
    register_io_source(chunk_sequences, schema=SEQUENCE_SCHEMA).sink_parquet(
        tmp / "sequences.parquet", row_group_size=SEQUENCE_ROW_GROUP
    )
    return _Core(
        items=items,
        users=users,
        n_behaviors=np.concatenate(n_behaviors),
        before_test=pl.DataFrame(
            {
                "user_id": users,
                "n_total": np.concatenate([t["before_test"] for t in totals if t]).astype(
                    np.uint32
                ),
            }
        ).filter(pl.col("n_total") > 0),
        windowed=pl.concat(windowed).sort(*WINDOW_ORDER),
        n_history=n_history,
        labels=labels,
        label_cols=label_cols,
    )


def _user_ranges(path: Path, n_chunks: int) -> pl.DataFrame:
    """user_id -> __chunk: n_chunks consecutive ranges of the sorted user ids, each with about
    the same number of rows (a user is never split)."""
    lf, _ = generic.scan(path, "behaviors")
    per_user = (
        lf.group_by("user_id")
        .len()
        .collect(engine="streaming")
        .drop_nulls("user_id")
        .sort("user_id")
    )
    rows = per_user["len"].to_numpy().astype(np.int64)
    before = np.cumsum(rows) - rows
    chunk = np.minimum(before * n_chunks // max(int(rows.sum()), 1), n_chunks - 1)
    return per_user.select("user_id", __chunk=pl.Series(chunk.astype(np.uint32)))


def _partition(
    path: Path,
    table: str,
    ranges: pl.DataFrame,
    out: Path,
    n_chunks: int,
    categorical: pl.Categorical,
) -> list[pl.LazyFrame | None]:
    """Stream `table` (as generic.scan reads it: line numbers and row checks included) into one
    Parquet folder per chunk; rows of users not in `ranges` go to chunk 0. Returns each chunk's
    rows (None: no rows), with user_id and text of dtype `categorical`.

    user_id and text are hashed once, here, and stored as their Categorical codes: the chunk
    files hold integers rather than strings, and `_check` gets Categorical columns without
    hashing the strings again. The codes are those of `categorical`'s mapping: the caller
    keeps a Series of that dtype alive until the chunks are read (Polars frees a mapping that
    no Series uses).
    """
    lf, _ = generic.scan(path, table)
    keys = [c for c in ("user_id", "text") if c in lf.collect_schema().names()]
    (
        lf.with_columns(pl.col(*keys).cast(categorical))
        .join(
            ranges.lazy().with_columns(pl.col("user_id").cast(categorical)),
            on="user_id",
            how="left",
            maintain_order="left",
        )
        .with_columns(pl.col("__chunk").fill_null(0), pl.col(*keys).to_physical())
        .sink_parquet(
            pl.PartitionBy(out, key="__chunk", include_key=False),
            mkdir=True,
            compression="lz4",
            statistics=False,
        )
    )
    chunks: list[pl.LazyFrame | None] = []
    for c in range(n_chunks):
        files = sorted((out / f"__chunk={c}").glob("*.parquet"))
        chunks.append(
            pl.scan_parquet(files).with_columns(pl.col(*keys).cat.to(categorical))
            if files
            else None
        )
    return chunks


def _kth_smallest(sorted_parts: list[np.ndarray], k: int) -> int:
    """The k-th smallest value (0-based) of several sorted integer arrays, without merging
    them: a binary search on the value (the arrays may be memory-mapped)."""
    parts = [a for a in sorted_parts if len(a)]
    lo, hi = min(int(a[0]) for a in parts), max(int(a[-1]) for a in parts)
    while lo < hi:  # invariant: the answer lies in [lo, hi]
        mid = (lo + hi) // 2
        if sum(int(np.searchsorted(a, mid, side="right")) for a in parts) > k:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _finish(core: _Core, tmp: Path, opts: PrepareOptions, report: dict) -> None:
    """Splits, users.parquet, impressions.parquet, labels.parquet and the data report."""
    imps_out = split_impressions(core.windowed, opts.ctr_valid_frac, opts.label_ratios, opts.seed)
    imps_out = (
        imps_out.sort("user_id", "timestamp", "line")
        .drop("line")
        .with_columns(pl.col("user_id").cast(pl.String))
    )
    imps_out.write_parquet(tmp / "impressions.parquet")

    labels_out = split_labels(core.labels, opts.demo_split, opts.label_ratios, opts.seed)
    labels_out.sort("user_id").write_parquet(tmp / "labels.parquet")

    before_test = core.before_test
    eligible = before_test.filter(pl.col("n_total") >= 2)["user_id"].to_list()
    rank = _shuffled_rank(eligible, opts.seed + 1)
    n_valid = int(round(opts.pretrain_valid_frac * len(eligible)))
    pre_split = pl.DataFrame(
        {"user_id": eligible, "pretrain_split": np.where(rank < n_valid, "valid", "train")},
        schema={"user_id": pl.String, "pretrain_split": pl.String},
    )
    n_per_user = pl.DataFrame(
        {"user_id": core.users, "n_behaviors": core.n_behaviors.astype(np.uint32)}
    )
    users_out = n_per_user.join(pre_split, on="user_id", how="left", maintain_order="left")
    users_out.write_parquet(tmp / "users.parquet")

    # ---- report
    items, label_cols = core.items, core.label_cols
    window_counts = dict(imps_out.group_by("window").len().iter_rows())
    report["behaviors"].update(
        users=users_out.height,
        items=items.height,
        items_from_behaviors=int((items["n_behaviors"] > 0).sum()),
        behaviors_per_user=_distribution(users_out["n_behaviors"]),
        truncated_users=int((before_test["n_total"] > opts.max_behaviors).sum()),
    )
    report["impressions"].update(
        windows={
            "history_not_used": core.n_history,
            **{k: int(v) for k, v in sorted(window_counts.items())},
        },
        click_rate={
            w: round(float(imps_out.filter(pl.col("window") == w)["clicked"].mean() or 0), 4)
            for w in ("train", "valid", "test")
        },
        subsets={ratio_column(r): int(imps_out[ratio_column(r)].sum()) for r in opts.label_ratios},
    )
    report["labels"].update(
        label_columns=label_cols,
        splits={
            k: int(v)
            for k, v in sorted(dict(labels_out.group_by("split").len().iter_rows()).items())
        },
        subsets={
            ratio_column(r): int(labels_out[ratio_column(r)].sum()) for r in opts.label_ratios
        },
        balance={
            c: {
                str(k): int(v)
                for k, v in sorted(
                    labels_out.group_by(c).len().iter_rows(), key=lambda kv: str(kv[0])
                )
            }
            for c in label_cols
        },
    )
    report["pretrain"] = {
        "users": len(eligible),
        "valid_users": n_valid,
        "behaviors_before_test": int(before_test["n_total"].sum()),
    }
    for t in ("behaviors", "labels", "impressions"):
        r = report[t]
        r["reconciles"] = r["rows_read"] == r["rows_kept"] + sum(r["rows_dropped"].values())
        assert r["reconciles"], f"data report does not reconcile for {t}: {r}"
    (tmp / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
