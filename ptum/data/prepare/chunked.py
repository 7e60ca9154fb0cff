"""Prepare on a log bigger than memory: `prepare_in_memory`'s outputs, streaming the behaviors
through in chunks of whole users.

The behaviors and impressions are first split on disk (one streaming pass each, user ids and
texts stored as codes) into n_chunks ranges of whole users, in sorted user order and of about
equal behavior counts. Everything but the global CTR cut-offs, the item table and the
train/valid draw of CTR samples is per user, so each chunk is validated and ordered into
timelines (pass 1), then cut into sequences (pass 2) on its own; chunks' sequences are
concatenated in user order. What stays in memory across chunks: the user ids, the distinct
texts, per-user counts, the bad rows (one per chunk unless quarantined) and the CTR-window
impressions (the CTR samples written to impressions.parquet).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from polars.io.plugins import register_io_source
from tqdm import tqdm

from ptum.data import generic
from ptum.data.prepare import views
from ptum.data.prepare.in_memory import Core
from ptum.data.prepare.items import NO_IMPRESSIONS, ctr_columns, item_table
from ptum.data.prepare.options import PrepareOptions
from ptum.data.prepare.sources import Source, Sources
from ptum.data.prepare.splits import WINDOW_ORDER, global_cutoffs, global_windows, user_cut
from ptum.data.prepare.validate import (
    check_rows,
    keep_bad,
    no_table,
    no_valid_rows,
    read_labels,
    settle,
)


@dataclass
class _Chunks:
    """What pass 1 keeps of each chunk's valid behaviors (the timelines themselves are on disk,
    in `work`: ts_<c>.npy and text_<c>.npy, rows sorted by user, time, line)."""

    work: Path
    users_of: list[pl.Series] = field(default_factory=list)  # each chunk's sorted user ids
    n_behaviors: list[np.ndarray] = field(default_factory=list)  # (U_c,) behaviors per user
    texts_of: list[pl.Series] = field(default_factory=list)  # each chunk's distinct texts
    text_counts: list[np.ndarray] = field(default_factory=list)  # (T_c,) behaviors per text


def prepare_chunked(
    sources: Sources, tmp: Path, opts: PrepareOptions, report: dict, n_chunks: int
) -> Core:
    """`prepare_in_memory`'s outputs, holding about 1/n_chunks of the behaviors at a time (see
    the module docstring). Writes items.parquet and sequences.parquet into `tmp`; its scratch
    files go to tmp/chunks. Each pass over the chunks shows a progress bar on a terminal."""
    work, qdir = tmp / "chunks", tmp / "quarantine"

    def say(step: str) -> None:
        print(f"prepare: {n_chunks} chunks of whole users: {step}", file=sys.stderr, flush=True)

    say("splitting behaviors and impressions by user range")
    # The chunk files' user_id and text codes: a mapping of this run's own, kept alive by
    # `codes_in_use` until every chunk is validated.
    categorical = pl.Categorical(pl.Categories.random())
    codes_in_use = pl.Series(dtype=categorical)
    beh_chunks, imp_chunks = _split_by_user(sources, work, n_chunks, categorical)
    say("validating")
    chunks = _validate_behaviors(beh_chunks, sources.behaviors, work, opts, qdir, report)
    users = pl.concat(chunks.users_of)  # consecutive ranges of sorted ids: still sorted
    user_enum = pl.Enum(users)
    imp_texts, stamps = _validate_impressions(
        imp_chunks, sources.impressions, chunks, opts, qdir, report
    )
    del codes_in_use
    labels, label_cols = read_labels(sources.labels, opts, qdir, user_enum, report)
    items, item_enum = _items(chunks, imp_texts)
    items.write_parquet(tmp / "items.parquet")
    del imp_texts
    # Global CTR windows: cut-offs over every chunk's impressions.
    sorted_ts = [np.load(f, mmap_mode="r") for f in stamps]
    cutoffs = global_cutoffs(
        sum(len(a) for a in sorted_ts),
        lambda k: kth_smallest(sorted_ts, k),
        opts.ctr_train_frac,
        opts.ctr_test_frac,
    )
    say("sequences")
    labeled = users.is_in(labels["user_id"].implode()).to_numpy()
    totals, windowed, n_history = _windows_and_totals(
        chunks, user_enum, item_enum, cutoffs, labeled
    )
    _write_sequences(chunks, totals, tmp / "sequences.parquet", opts.max_behaviors)
    n_total = np.concatenate([t["before_test"] for t in totals if t]).astype(np.uint32)
    return Core(
        items=items,
        users=users,
        n_behaviors=np.concatenate(chunks.n_behaviors),
        before_test=pl.DataFrame({"user_id": users, "n_total": n_total}).filter(
            pl.col("n_total") > 0
        ),
        windowed=pl.concat(windowed).sort(*WINDOW_ORDER),
        n_history=n_history,
        labels=labels,
        label_cols=label_cols,
    )


def _progress(items: Iterable, desc: str, total: int | None = None) -> Iterable:
    """`items`, with a tqdm bar on stderr when it is a terminal (nothing in logs and pipes)."""
    return tqdm(
        items,
        desc=f"prepare: {desc}",
        total=total,
        unit="chunk",
        file=sys.stderr,
        leave=False,
        disable=not sys.stderr.isatty(),
    )


def _split_by_user(
    sources: Sources, work: Path, n_chunks: int, categorical: pl.Categorical
) -> tuple[list[pl.LazyFrame | None], list[pl.LazyFrame | None]]:
    """The behaviors and impressions, each split on disk into n_chunks ranges of whole users
    (see _partition); None for a chunk without rows (every chunk without an impressions table)."""
    ranges = _user_ranges(sources.behaviors, n_chunks)
    beh_chunks = _partition(
        sources.behaviors, "behaviors", ranges, work / "behaviors", n_chunks, categorical
    )
    if sources.impressions is None:
        return beh_chunks, [None] * n_chunks
    imp_chunks = _partition(
        sources.impressions,
        "impressions",
        ranges,
        work / "impressions",
        n_chunks,
        categorical,
    )
    return beh_chunks, imp_chunks


def _items(chunks: _Chunks, imp_texts: pl.Series) -> tuple[pl.DataFrame, pl.Enum]:
    """The item table (see items.item_table) from every chunk's distinct behavior texts and
    their counts, and the distinct impression texts."""
    texts = pl.DataFrame(
        {"text": pl.concat(chunks.texts_of), "n": np.concatenate(chunks.text_counts)}
    )
    texts = texts.group_by("text").agg(pl.col("n").sum())  # a text may occur in many chunks
    return item_table(texts["text"], texts["n"].to_numpy(), imp_texts)


def _validate_behaviors(
    beh_chunks: list[pl.LazyFrame | None],
    source: Source,
    work: Path,
    opts: PrepareOptions,
    qdir: Path,
    report: dict,
) -> _Chunks:
    """Pass 1: validate each chunk's behaviors and store its timeline as integer codes on disk;
    report["behaviors"] gets the counts. Raises on bad rows (on_bad_rows=error) or none valid."""
    chunks, parts = _Chunks(work), []
    for c, chunk in enumerate(_progress(beh_chunks, "validating behaviors")):
        if chunk is None:  # a range emptied by one big user before it
            chunks.users_of.append(pl.Series("user_id", [], pl.String))
            chunks.n_behaviors.append(np.zeros(0, dtype=np.int64))
            chunks.texts_of.append(pl.Series("text", [], pl.String))
            chunks.text_counts.append(np.zeros(0, dtype=np.int64))
            continue
        good, counts, bad, codes = check_rows(
            chunk, source, "behaviors", good_columns=["line", "timestamp"]
        )
        (user_codes, users_c), (text_codes, texts_c) = codes["user_id"], codes["text"]
        # Time-ordered per user (see views.timelines), once here rather than once per view.
        timeline = good.with_columns(
            user=pl.Series(user_codes, dtype=pl.UInt32), text=pl.Series(text_codes, dtype=pl.UInt32)
        ).sort("user", "timestamp", "line")
        np.save(work / f"ts_{c}.npy", timeline["timestamp"].to_numpy())
        np.save(work / f"text_{c}.npy", timeline["text"].to_numpy())
        del timeline
        chunks.users_of.append(users_c)
        chunks.n_behaviors.append(np.bincount(user_codes, minlength=len(users_c)))
        chunks.texts_of.append(texts_c)
        chunks.text_counts.append(np.bincount(text_codes, minlength=len(texts_c)))
        parts.append((counts, keep_bad(bad, opts)))
        del good, codes, user_codes, text_codes
    report["behaviors"] = settle(source, "behaviors", opts, qdir, parts)
    if report["behaviors"]["rows_kept"] == 0:
        raise no_valid_rows(source)
    return chunks


def _validate_impressions(
    imp_chunks: list[pl.LazyFrame | None],
    source: Source | None,
    chunks: _Chunks,
    opts: PrepareOptions,
    qdir: Path,
    report: dict,
) -> tuple[pl.Series, list[Path]]:
    """Pass 1 on the impressions: validate each chunk against its own users, store its good rows
    (impressions_<c>.parquet) and sorted timestamps (timestamps_<c>.npy); report["impressions"]
    gets the counts. Returns the distinct impression texts and the timestamp files."""
    no_texts = pl.Series("text", [], pl.String)
    if source is None:  # no impressions table: every chunk is None
        report["impressions"] = no_table()
        return no_texts, []
    imp_texts, stamps, parts = [no_texts], [], []
    work = chunks.work
    for c, chunk in enumerate(_progress(imp_chunks, "validating impressions")):
        if chunk is None:
            continue
        good, counts, bad, codes = check_rows(
            chunk, source, "impressions", known_users=pl.Enum(chunks.users_of[c])
        )
        good.write_parquet(work / f"impressions_{c}.parquet", compression="lz4")
        np.save(work / f"timestamps_{c}.npy", np.sort(good["timestamp"].to_numpy()))
        stamps.append(work / f"timestamps_{c}.npy")
        imp_texts.append(codes["text"][1])
        parts.append((counts, keep_bad(bad, opts)))
        del good, codes
    report["impressions"] = settle(source, "impressions", opts, qdir, parts)
    return pl.concat(imp_texts), stamps


def _windows_and_totals(
    chunks: _Chunks,
    user_enum: pl.Enum,
    item_enum: pl.Enum,
    cutoffs: tuple[int | None, int | None],
    labeled: np.ndarray,
) -> tuple[list[dict[str, np.ndarray]], list[pl.DataFrame], int]:
    """Pass 2, first half, chunk by chunk: the CTR windows of the impressions, each view's sizes
    (view_totals) and the behaviors' item ids (item_<c>.npy). Returns (per-chunk view totals,
    {} for an empty chunk; per-chunk CTR-window impressions; impressions in history)."""
    work, (t_train, t_test) = chunks.work, cutoffs
    cut = pl.DataFrame(
        {"t_train": [t_train], "t_test": [t_test]},
        schema={"t_train": pl.Int64, "t_test": pl.Int64},
    )
    first = np.cumsum([0] + [len(u) for u in chunks.users_of])
    totals: list[dict[str, np.ndarray]] = []
    windowed: list[pl.DataFrame] = []
    n_history = 0
    for c, users_c in enumerate(_progress(chunks.users_of, "windows and view sizes")):
        imp_file = work / f"impressions_{c}.parquet"
        imps = (
            pl.read_parquet(imp_file) if imp_file.exists() else pl.DataFrame(schema=NO_IMPRESSIONS)
        )
        win = global_windows(ctr_columns(imps, user_enum, item_enum), t_train, t_test)
        windowed.append(win.filter(pl.col("window") != "history"))
        n_history += int((win["window"] == "history").sum())
        del imps, win
        if len(users_c) == 0:
            totals.append({})
            continue
        totals.append(
            views.view_totals(
                np.load(work / f"ts_{c}.npy"),
                chunks.n_behaviors[c],
                user_cut(users_c, cut),
                labeled[first[c] : first[c + 1]],
            )
        )
        texts = chunks.texts_of[c]
        item_of_code = texts.cast(item_enum).to_physical().cast(pl.Int32).to_numpy() + 1
        np.save(work / f"item_{c}.npy", item_of_code[np.load(work / f"text_{c}.npy")])
    return totals, windowed, n_history


def _write_sequences(
    chunks: _Chunks, totals: list[dict[str, np.ndarray]], out: Path, max_behaviors: int
) -> None:
    """Pass 2, second half: the sequences view by view (the file is sorted by view, then user),
    each chunk's rows appended as they come, cut from its memory-mapped timelines."""
    work = chunks.work
    present = [c for c, users_c in enumerate(chunks.users_of) if len(users_c)]
    steps = [(view, c) for view in sorted(views.VIEWS) for c in present]

    def chunk_sequences(*_) -> Iterator[pl.DataFrame]:
        for view, c in _progress(steps, "sequences"):
            yield views.view_rows(
                view,
                chunks.users_of[c],
                totals[c][view],
                np.load(work / f"ts_{c}.npy", mmap_mode="r"),
                np.load(work / f"item_{c}.npy", mmap_mode="r"),
                chunks.n_behaviors[c],
                max_behaviors,
            )

    # Polars writes what the generator yields, in order, compressing on its own threads.
    register_io_source(chunk_sequences, schema=views.SEQUENCE_SCHEMA).sink_parquet(
        out, row_group_size=views.SEQUENCE_ROW_GROUP
    )


def _user_ranges(source: Source, n_chunks: int) -> pl.DataFrame:
    """user_id -> __chunk: n_chunks consecutive ranges of the sorted user ids, each with about
    the same number of rows (a user is never split)."""
    lf, _ = generic.scan(source.path, "behaviors", source.origin)
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
    source: Source,
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
    files hold integers rather than strings, and `check_rows` gets Categorical columns without
    hashing the strings again. The codes are those of `categorical`'s mapping: the caller
    keeps a Series of that dtype alive until the chunks are read (Polars frees a mapping that
    no Series uses).
    """
    lf, _ = generic.scan(source.path, table, source.origin)
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


def kth_smallest(sorted_parts: list[np.ndarray], k: int) -> int:
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
