"""The generic input format, read with line numbers and validated row by row (Polars, lazy).

Three tables, each a TSV file with a header line (UTF-8, tab-separated, no quoting: fields may
not contain tabs or newlines) or a Parquet file:

    behaviors(user_id, timestamp, text[, item_id])
    labels(user_id, <one column per label>)          any label column is a demographic task
    impressions(user_id, timestamp, text, clicked[, item_id])

`timestamp` is integer seconds since the epoch; `clicked` is 0 or 1; `item_id` is an optional
source identifier used only to tell apart two events with the same text at the same second.
Extra columns are ignored: they are dropped as the file is scanned, before any column of ours
is added, so a column of any name or type does no harm. A label column may not have a name
that prepare gives its own columns (RESERVED_LABELS). Each row gets a `line` (1-based line in
a TSV, row in Parquet) and a `reason` (null when the row is good), so the caller can either
stop at the first bad row with a precise DataError or quarantine bad rows and count them per
reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from ptum.data import text_bytes
from ptum.data.errors import DataError
from ptum.data.verified import decoder_failure

REQUIRED = {
    "behaviors": ("user_id", "timestamp", "text"),
    "labels": ("user_id",),
    "impressions": ("user_id", "timestamp", "text", "clicked"),
}
OPTIONAL = {"behaviors": ("item_id",), "labels": (), "impressions": ("item_id",)}
# A Parquet table that `ptum ingest` converted from a text file (ptum_tsv) keeps, in this
# column, the line of that file each row came from: messages name that line.
SOURCE_LINE = "source_line"
# Label column names prepare uses for columns of its own (scan's `line` and `reason`, the
# split and its `train_<ratio>` subsets, the source line) and the prefix of scan's internal ones.
RESERVED_LABELS = ("line", "reason", "split", SOURCE_LINE)
RESERVED_PREFIXES = ("train_", "__")
REASONS = (
    "blank_line",
    "control_byte",
    "malformed_line",
    "bad_utf8",
    "missing_user",
    "bad_timestamp",
    "empty_text",
    "bad_clicked",
    "duplicate_event",
    "duplicate_user",
    "unknown_user",
)


def find_table(directory: Path, table: str) -> Path | None:
    """The file holding `table` in `directory` (.parquet, .tsv or .tsv.gz-less .txt), or None;
    a DataError when two of them are there (which one the user means is not ours to guess)."""
    found = [p for s in (".parquet", ".tsv", ".txt") if (p := directory / f"{table}{s}").exists()]
    if len(found) > 1:
        raise DataError(
            found[0],
            None,
            f"{' and '.join(p.name for p in found)} both hold table {table!r} in {directory}: "
            "keep one of them",
        )
    return found[0] if found else None


def _tsv_header(path: Path, name: Path) -> list[str]:
    """The header fields of the TSV file `path` (`name`: the file to name in errors)."""
    with path.open("rb") as f:
        first = f.readline()
    try:  # utf-8-sig: a byte-order mark (Excel, Notepad) is not part of the first name
        header = first.decode("utf-8-sig").rstrip("\r\n")
    except UnicodeDecodeError:
        raise DataError(name, 1, "header line is not valid UTF-8 (not a TSV text file?)") from None
    if not header:
        raise DataError(name, 1, "empty file or missing header line")
    return header.split("\t")


def scan(path: Path, table: str, origin: Path | None = None) -> tuple[pl.LazyFrame, list[str]]:
    """Lazily read a table as string columns plus `line` and a per-row `reason`.

    Returns the LazyFrame (columns: line, the table's columns, reason) and the label columns
    (for `labels`; empty otherwise). Missing required columns raise a DataError at once.
    Row-level problems that need the whole table (duplicates, unknown users) are added later by
    the caller; this function flags what one row alone can tell. A Parquet table written by
    `ptum ingest` from a text file may carry SOURCE_LINE (that file's line of each row): it is
    kept, for messages. `origin`: the file the user gave, named in errors (default `path`; it
    differs when `path` is ingest's copy of it).
    """
    name = origin or path
    if path.suffix == ".parquet":
        lf, fields, label_cols, typed = _scan_parquet(path, table, name)
    else:
        lf, fields, label_cols = _scan_tsv(path, table, name)
        typed = set()
    keep = [*fields, *label_cols]
    extra = [SOURCE_LINE] if SOURCE_LINE in typed else []
    lf = lf.select("line", *keep, *extra, "__reason")
    # Strip every string field once; the checks and the output values below read the result.
    lf = lf.with_columns(pl.col(c).str.strip_chars() for c in keep if c not in typed)
    lf = lf.with_columns(reason=_row_reason(fields, typed)).drop("__reason")
    return _typed(lf, fields, typed, label_cols), label_cols


def _columns(
    columns: list[str], table: str, name: Path, line: int | None
) -> tuple[list[str], list[str]]:
    """(the table's own columns, the label columns) among a file's `columns`, in file order:
    every other column is ignored. Label columns (all but user_id, for `labels`) may not have a
    name prepare uses itself (a DataError at `line` of `name` says to rename them)."""
    fields = [c for c in columns if c in REQUIRED[table] or c in OPTIONAL[table]]
    if table != "labels":
        return fields, []
    label_cols = [c for c in columns if c != "user_id"]
    if not label_cols:
        raise DataError(name, line, "labels table has no label column besides user_id")
    reserved = [c for c in label_cols if c in RESERVED_LABELS or c.startswith(RESERVED_PREFIXES)]
    if reserved:
        raise DataError(
            name,
            line,
            f"label column(s) {reserved} have a name ptum gives its own columns "
            f"({', '.join(RESERVED_LABELS)}, {'*, '.join(RESERVED_PREFIXES)}*): rename them",
        )
    return fields, label_cols


def _scan_parquet(
    path: Path, table: str, name: Path
) -> tuple[pl.LazyFrame, list[str], list[str], set[str]]:
    """A Parquet table's own and label columns (see `_columns`; the others are dropped) as
    strings (integer timestamp/clicked/source line kept as they are: `typed`), with `line` =
    1-based row number and a `__reason` for binary text that is not UTF-8. Returns (frame, own
    columns, label columns, typed). A column of a type that cannot hold its values (a list, a
    struct; a float timestamp) is a DataError naming `name`."""
    lf = pl.scan_parquet(path)
    try:
        schema = lf.collect_schema()  # reads the footer: garbage fails here
    except BaseException as exc:  # a polars panic is not an Exception
        kind = decoder_failure(exc)
        if kind is None:
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise DataError(name, None, f"not a readable Parquet file ({kind}: {first})") from None
    columns = list(schema.names())
    missing = [c for c in REQUIRED[table] if c not in columns]
    if missing:
        raise DataError(name, None, f"missing column(s) {missing}; file has {columns}", "row")
    fields, label_cols = _columns(columns, table, name, None)
    wanted = [*fields, *label_cols]
    for c in wanted:
        _check_type(name, c, schema[c])
    # Integer timestamp/clicked columns skip the string round trip below (same values).
    typed: set[str] = {
        c for c in ("timestamp", "clicked") if c in fields and schema[c].is_integer()
    }
    if table != "labels" and SOURCE_LINE in columns and schema[SOURCE_LINE].is_integer():
        typed.add(SOURCE_LINE)  # the line of the text file ingest converted (kept for messages)
    binary = [c for c in wanted if schema[c] == pl.Binary]
    reason = pl.lit(None, dtype=pl.String)
    if binary:
        reason = (
            pl.when(
                pl.any_horizontal(
                    pl.col(c).map_batches(text_bytes.not_utf8, pl.Boolean, is_elementwise=True)
                    for c in binary
                )
            )
            .then(pl.lit("bad_utf8"))
            .otherwise(reason)
        )
    as_text = [
        pl.col(c).map_batches(text_bytes.utf8_text, pl.String, is_elementwise=True)
        if c in binary
        else pl.col(c).cast(pl.String)
        for c in wanted
        if c not in typed and schema[c] != pl.String
    ]
    lf = (
        lf.select(*wanted, *sorted(typed - set(wanted)))
        .with_row_index("line", offset=1)
        .with_columns(reason.alias("__reason"))
        .with_columns(as_text)
    )
    return lf, fields, label_cols, typed


def _check_type(name: Path, column: str, dtype: pl.DataType) -> None:
    """A DataError unless a Parquet column of type `dtype` can hold `column`'s values: an
    integer or string timestamp/clicked (strings are checked row by row); any scalar for the
    other columns (read as strings). Lists, structs, arrays and objects never can."""
    if column in ("timestamp", "clicked"):
        ok = dtype.is_integer() or dtype.is_decimal() or _is_text(dtype) or dtype == pl.Null
        expected = (
            "an integer column (seconds since the epoch)"
            if column == "timestamp"
            else "an integer column (0 or 1)"
        )
    else:
        ok = not dtype.is_nested() and dtype != pl.Object and dtype != pl.Unknown
        expected = "a string (or integer) column"
    if not ok:
        raise DataError(
            name,
            None,
            f"column {column!r} has type {dtype}, expected {expected}; rewrite it with that type",
            "row",
        )


def _is_text(dtype: pl.DataType) -> bool:
    return dtype in (pl.String, pl.Binary) or isinstance(dtype, (pl.Categorical, pl.Enum))


def _scan_tsv(path: Path, table: str, name: Path) -> tuple[pl.LazyFrame, list[str], list[str]]:
    """A TSV table's own and label columns (see `_columns`; the others are never extracted) as
    strings, `line` = 1-based line number, and a `__reason` for what the line itself shows
    (blank, the control byte 0x1F, wrong field count, bad UTF-8). Returns (frame, own columns,
    label columns). Errors name `name`."""
    columns = _tsv_header(path, name)
    missing = [c for c in REQUIRED[table] if c not in columns]
    if missing:
        raise DataError(name, 1, f"missing column(s) {missing}; header has {columns}")
    if len(set(columns)) != len(columns):
        raise DataError(name, 1, f"duplicate column names in header {columns}")
    own, label_cols = _columns(columns, table, name, 1)
    control = text_bytes.lines_with(path, text_bytes.CONTROL)
    if 1 in control:
        raise DataError(name, 1, f"{text_bytes.CONTROL_DETAIL} (header line)")
    # One string column per physical line keeps line numbers exact (blank lines included)
    # and lets the split below find lines with the wrong number of fields. Lines holding the
    # separator itself (0x1F) are read cut short, and flagged by their number.
    raw = pl.scan_csv(
        path,
        has_header=False,
        separator="\x1f",
        quote_char=None,
        schema={"__raw": pl.String},
        encoding="utf8-lossy",
        skip_rows=1,
        truncate_ragged_lines=True if control else None,
        extra_columns="ignore" if control else None,
    ).with_row_index("line", offset=2)
    fields = pl.col("__raw").str.split("\t")
    index = {c: i for i, c in enumerate(columns)}
    blank = pl.col("__raw").is_null() | (pl.col("__raw").str.strip_chars() == "")
    first = (
        pl.when(pl.col("line").is_in(sorted(control))).then(pl.lit("control_byte")).when(blank)
        if control
        else pl.when(blank)
    )
    lf = (
        raw.with_columns(__fields=fields)
        .with_columns(
            pl.col("__fields").list.get(index[c], null_on_oob=True).alias(c)
            for c in (*own, *label_cols)
        )
        .with_columns(
            __reason=first.then(pl.lit("blank_line"))
            .when(pl.col("__fields").list.len() != len(columns))
            .then(pl.lit("malformed_line"))
            .when(text_bytes.not_utf8_lines(path))
            .then(pl.lit("bad_utf8"))
        )
        .drop("__raw", "__fields")
    )
    return lf, own, label_cols


def _row_reason(keep: list[str], typed: set[str]) -> pl.Expr:
    """The first problem of a row (null if none): the line's own, then the field checks of the
    table's own columns `keep` (label columns have none)."""
    ts = pl.col("timestamp").cast(pl.Int64, strict=False)
    checks: list[tuple[pl.Expr, str]] = [
        (pl.col("user_id").is_null() | (pl.col("user_id") == ""), "missing_user"),
    ]
    if "timestamp" in keep:
        checks.append((ts.is_null() | (ts < 0), "bad_timestamp"))
    if "text" in keep:
        checks.append((pl.col("text").is_null() | (pl.col("text") == ""), "empty_text"))
    if "clicked" in keep:
        valid = [0, 1] if "clicked" in typed else ["0", "1"]
        checks.append(
            (~pl.col("clicked").is_in(valid) | pl.col("clicked").is_null(), "bad_clicked")
        )
    reason = pl.col("__reason")
    for cond, name in checks:
        reason = pl.when(reason.is_null() & cond).then(pl.lit(name)).otherwise(reason)
    return reason


def _typed(lf: pl.LazyFrame, keep: list[str], typed: set[str], label_cols: list[str]):
    """Checked string fields -> their types (`keep`: the table's own columns): timestamp Int64,
    clicked Int8, empty label values null, item_id renamed source_item_id."""
    casts = []
    if "timestamp" in keep:
        casts.append(pl.col("timestamp").cast(pl.Int64, strict=False))
    if "clicked" in keep:
        casts.append(pl.col("clicked").cast(pl.Int8, strict=False))
    for c in label_cols:
        casts.append(pl.when(pl.col(c) == "").then(None).otherwise(pl.col(c)).alias(c))
    if "item_id" in keep:
        # The source's own id: kept only to tell apart same-second events with one text.
        casts.append(pl.col("item_id").alias("source_item_id"))
    out = lf.with_columns(casts) if casts else lf
    return out.drop("item_id") if "item_id" in keep else out


def mark_duplicates(df: pl.DataFrame, keys: list[str], reason: str) -> pl.DataFrame:
    """Mark every good row but the first (by line) of each group of `keys` with `reason`; row
    order kept.

    Sorts the good rows by (keys, line) and compares neighbours instead of hashing composite
    keys: much faster on long strings, fastest when the caller passes integer codes as keys.
    """
    good = df.select(
        pl.int_range(pl.len(), dtype=pl.UInt32).alias("__row"), *keys, "line", "reason"
    ).filter(pl.col("reason").is_null())
    # String keys sort faster as ranks of their distinct values (null stays null).
    good = good.with_columns(
        pl.col(k).cast(pl.Enum(good[k].unique().drop_nulls().sort())).to_physical()
        for k in keys
        if good.schema[k] == pl.String
    )
    same = pl.all_horizontal(pl.col(k).eq_missing(pl.col(k).shift(1)) for k in keys) & (
        pl.int_range(pl.len()) > 0
    )
    dup_rows = good.sort(*keys, "line").filter(same)["__row"].to_numpy()
    dup = np.zeros(df.height, dtype=bool)
    dup[dup_rows] = True
    return df.with_columns(
        reason=pl.when(pl.Series(dup)).then(pl.lit(reason)).otherwise(pl.col("reason"))
    )
