"""Validation of one table: row checks (from `generic.scan`), duplicates and unknown users; then
either the first bad row raises a DataError or the bad rows go to the quarantine. Counts every
row: rows read = kept + dropped per reason.

Exact duplicate events (same user, second and text; `duplicate_event`) are dropped and counted
by default (`on_duplicates=drop`): double-logged events are common in real logs. Texts longer
than LONG_TEXT characters are kept unchanged, with one warning line per table.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ptum.data import bad_rows, generic
from ptum.data.errors import DataError
from ptum.data.prepare.options import PrepareOptions
from ptum.data.prepare.sources import Source

# Characters. A longer text is kept as it is (tokenize reads only its first max_tokens tokens;
# truncating would merge two long texts with one beginning into one item) but warned about:
# it is most likely a field separator missing in the source.
LONG_TEXT = 10_000
DUPLICATE = "duplicate_event"
DUPLICATE_ADVICE = "set prepare.on_duplicates=drop to drop and count them"


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


def validate_table(
    source: Source,
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
    lf, label_cols = generic.scan(source.path, table, source.origin)
    good, counts, bad, codes = check_rows(lf, source, table, known_users, good_columns)
    counts = settle(source, table, opts, quarantine_dir, [(counts, bad)])
    if good.height == 0 and table != "impressions":
        raise no_valid_rows(source)
    return good, counts, label_cols, codes


def no_valid_rows(source: Source) -> DataError:
    """The error for a table without a single valid row."""
    unit = "row" if source.origin.suffix == ".parquet" else "line"
    return DataError(source.origin, None, "no valid rows", unit)


def check_rows(
    lf: pl.LazyFrame,
    source: Source,
    table: str,
    known_users: pl.Enum | None = None,
    good_columns: list[str] | None = None,
) -> tuple[pl.DataFrame, dict, pl.DataFrame, dict[str, tuple[np.ndarray, pl.Series]]]:
    """Flag the bad rows of `lf` (the output of `generic.scan`, or a chunk of it holding whole
    users): row checks, duplicates, unknown users. Raises nothing.

    Returns (good rows sorted by line, counts, bad rows sorted by line, codes); see validate_table.
    """
    schema = lf.collect_schema()
    columns = schema.names()
    # Long, repetitive strings held as Categorical (chunks from `chunked` come so already):
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
        keys, dup_reason = ["__user", "timestamp", "__text"], DUPLICATE
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
    counts = _counts(df, source)
    if table != "labels":
        counts["long"] = _long_texts(df, texts)
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


def _counts(df: pl.DataFrame, source: Source) -> dict:
    """Rows read, kept and dropped per reason of checked rows (`reason` null: kept)."""
    kept = df["reason"].null_count()
    dropped = {str(k): int(v) for k, v in df["reason"].drop_nulls().value_counts().iter_rows()}
    # Blank lines are not data rows: count them apart so rows_read means data rows.
    blank = dropped.pop("blank_line", 0)
    counts: dict[str, Any] = {
        "file": str(source.path),
        "rows_read": kept + sum(dropped.values()),
        "rows_kept": kept,
        "rows_dropped": dropped,
        "blank_lines_skipped": blank,
    }
    if source.origin != source.path:
        counts["source"] = str(source.origin)
    return counts


def _long_texts(df: pl.DataFrame, texts: pl.Series) -> tuple[int, dict | None, int]:
    """(kept rows whose text is over LONG_TEXT characters, the first of them, the longest
    length) of checked rows; `__text` codes the text as a position in `texts`."""
    lengths = texts.str.len_chars().to_numpy()
    if not len(lengths) or lengths.max() <= LONG_TEXT:
        return 0, None, 0
    code = df["__text"].to_numpy()
    is_long = (code >= 0) & (lengths[np.maximum(code, 0)] > LONG_TEXT)
    rows = df.filter(pl.Series(is_long) & pl.col("reason").is_null())
    if rows.height == 0:
        return 0, None, 0
    where = [c for c in ("line", generic.SOURCE_LINE) if c in rows.columns]
    first = rows.select(where).sort("line").row(0, named=True)
    return rows.height, first, int(lengths[code[is_long]].max())


def settle(
    source: Source,
    table: str,
    opts: PrepareOptions,
    quarantine_dir: Path,
    parts: list[tuple[dict, pl.DataFrame]],
) -> dict:
    """Counts and bad rows of a table's chunks (from check_rows) -> the table's counts.

    Raises a DataError at the first bad row of the whole file (on_bad_rows=error; duplicate
    events only with on_duplicates=error) or writes the bad rows to the quarantine, each with
    its raw line. Warns (one line) about texts longer than LONG_TEXT characters.
    """
    counts: dict[str, Any] = {
        "file": str(source.path),
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
    if source.origin != source.path:
        counts["source"] = str(source.origin)
    if table != "labels":
        counts["long_texts"] = _warn_long(source, table, [c["long"] for c, _ in parts])
    if counts["rows_dropped"]:
        bad = pl.concat([b for _, b in parts if b.height]).sort("line")
        _raise_if_strict(source, bad, counts["rows_dropped"], opts)
        if opts.on_bad_rows == "quarantine":
            raw = bad_rows.raw_rows(source.path, bad["line"].to_list())
            quarantine_dir.mkdir(parents=True, exist_ok=True)
            bad.with_columns(raw).write_parquet(quarantine_dir / f"{table}.parquet")
    return counts


def _raise_if_strict(source: Source, bad: pl.DataFrame, total: dict, opts: PrepareOptions) -> None:
    """Raise for the first of the bad rows (sorted by line) the options do not let through
    (`first_refused`)."""
    first = first_refused(bad, opts.on_bad_rows, opts.on_duplicates)
    if first.height:
        advice = (
            DUPLICATE_ADVICE
            if first["reason"][0] == DUPLICATE
            else "set prepare.on_bad_rows=quarantine to drop and count them"
        )
        bad_rows.raise_first(first, source.path, total, origin=source.origin, advice=advice)


def first_refused(bad: pl.DataFrame, on_bad_rows: str, on_duplicates: str) -> pl.DataFrame:
    """The first of the bad rows (sorted by line) that the settings do not let through, or no
    row: every bad row with on_bad_rows=error, except duplicate events unless
    on_duplicates=error."""
    dup = bad["reason"] == DUPLICATE
    strict = pl.Series([on_bad_rows == "error"] * bad.height, dtype=pl.Boolean)
    strict = (strict & ~dup) | (dup & (on_duplicates == "error"))
    return bad.filter(strict).head(1)


def _warn_long(source: Source, table: str, parts: list[tuple[int, dict | None, int]]) -> int:
    """Print one warning line for a table's texts over LONG_TEXT characters; their count."""
    n = sum(p[0] for p in parts)
    if n:
        first = min((p[1] for p in parts if p[1] is not None), key=lambda r: r["line"])
        longest = max(p[2] for p in parts)
        print(
            f"prepare: warning: {source.where(first)}: {n} {table} text(s) longer than "
            f"{LONG_TEXT:,} characters (longest {longest:,}), kept unchanged (tokenize reads "
            "only their first tokenize.max_tokens tokens); a missing field separator?",
            file=sys.stderr,
            flush=True,
        )
    return n


def keep_bad(bad: pl.DataFrame, opts: PrepareOptions) -> pl.DataFrame:
    """The bad rows of a chunk that `settle` may need: all of them to quarantine them, else the
    first duplicate event and the first other bad row."""
    if opts.on_bad_rows == "quarantine":
        return bad
    dup = pl.col("reason") == DUPLICATE
    return pl.concat([bad.filter(dup).head(1), bad.filter(~dup).head(1)]).sort("line")


def _recode(codes: np.ndarray, values: pl.Series) -> tuple[np.ndarray, pl.Series]:
    """Drop the values no code uses; renumber the codes densely, order kept."""
    used = np.bincount(codes, minlength=len(values)) > 0
    new = (np.cumsum(used) - 1).astype(np.int32)
    return new[codes], values.filter(pl.Series(used))


def no_table() -> dict:
    return {"file": None, "rows_read": 0, "rows_kept": 0, "rows_dropped": {}}


def read_labels(
    source: Source | None, opts: PrepareOptions, qdir: Path, user_enum: pl.Enum, report: dict
) -> tuple[pl.DataFrame, list[str]]:
    """The valid labels (user_id, <label columns>) and the label columns."""
    if source is None:
        report["labels"] = no_table()
        return pl.DataFrame(schema={"user_id": pl.String}), []
    labels, report["labels"], label_cols, _ = validate_table(
        source, "labels", opts, qdir, known_users=user_enum
    )
    return labels.drop("line"), label_cols
