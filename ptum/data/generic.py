"""The generic input format, read with line numbers and validated row by row (Polars, lazy).

Three tables, each a TSV file with a header line (UTF-8, tab-separated, no quoting: fields may
not contain tabs or newlines) or a Parquet file:

    behaviors(user_id, timestamp, text[, item_id])
    labels(user_id, <one column per label>)          any label column is a demographic task
    impressions(user_id, timestamp, text, clicked[, item_id])

`timestamp` is integer seconds since the epoch; `clicked` is 0 or 1; `item_id` is an optional
source identifier used only to tell apart two events with the same text at the same second.
Extra columns are ignored. Each row gets a `line` (1-based line in a TSV, row in Parquet) and
a `reason` (null when the row is good), so the caller can either stop at the first bad row
with a precise DataError or quarantine bad rows and count them per reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

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
REASONS = (
    "blank_line",
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
_REPLACEMENT = "\ufffd"  # what a lossy UTF-8 decode puts in place of bad bytes


def find_table(directory: Path, table: str) -> Path | None:
    """The file holding `table` in `directory` (.parquet, .tsv or .tsv.gz-less .txt), or None."""
    for suffix in (".parquet", ".tsv", ".txt"):
        p = directory / f"{table}{suffix}"
        if p.exists():
            return p
    return None


def _tsv_header(path: Path, name: Path) -> list[str]:
    """The header fields of the TSV file `path` (`name`: the file to name in errors)."""
    with path.open("rb") as f:
        first = f.readline()
    try:
        header = first.decode("utf-8").rstrip("\r\n")
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
        lf, columns, typed = _scan_parquet(path, table, name)
    else:
        lf, columns = _scan_tsv(path, table, name)
        typed = set()
    keep = [c for c in columns if c in REQUIRED[table] or c in OPTIONAL[table]]
    label_cols: list[str] = []
    if table == "labels":
        label_cols = [c for c in columns if c != "user_id"]
        if not label_cols:
            raise DataError(
                name,
                None if path.suffix == ".parquet" else 1,
                "labels table has no label column besides user_id",
            )
        keep = ["user_id", *label_cols]
    extra = [SOURCE_LINE] if SOURCE_LINE in typed else []
    lf = lf.select("line", *keep, *extra, "__reason")
    # Strip every string field once; the checks and the output values below read the result.
    lf = lf.with_columns(pl.col(c).str.strip_chars() for c in keep if c not in typed)
    lf = lf.with_columns(reason=_row_reason(keep, typed)).drop("__reason")
    return _typed(lf, keep, typed, label_cols), label_cols


def _scan_parquet(path: Path, table: str, name: Path) -> tuple[pl.LazyFrame, list[str], set[str]]:
    """A Parquet table as string columns (integer timestamp/clicked/source line kept as they
    are: `typed`), with `line` = 1-based row number and no reason yet. Errors name `name`."""
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
    # Integer timestamp/clicked columns skip the string round trip below (same values).
    typed = {
        c
        for c in (*REQUIRED[table], SOURCE_LINE)
        if c in ("timestamp", "clicked", SOURCE_LINE) and c in columns and schema[c].is_integer()
    }
    lf = (
        lf.with_row_index("line", offset=1)
        .with_columns(
            pl.col(c).cast(pl.String) for c in columns if c not in typed and schema[c] != pl.String
        )
        .with_columns(pl.lit(None, dtype=pl.String).alias("__reason"))
    )
    return lf, columns, typed


def _scan_tsv(path: Path, table: str, name: Path) -> tuple[pl.LazyFrame, list[str]]:
    """A TSV table as string columns, `line` = 1-based line number, and a `__reason` for what
    the line itself shows (blank, wrong field count, bad UTF-8). Errors name `name`."""
    columns = _tsv_header(path, name)
    missing = [c for c in REQUIRED[table] if c not in columns]
    if missing:
        raise DataError(name, 1, f"missing column(s) {missing}; header has {columns}")
    if len(set(columns)) != len(columns):
        raise DataError(name, 1, f"duplicate column names in header {columns}")
    # One string column per physical line keeps line numbers exact (blank lines included)
    # and lets the split below find lines with the wrong number of fields.
    raw = pl.scan_csv(
        path,
        has_header=False,
        separator="\x1f",
        quote_char=None,
        schema={"__raw": pl.String},
        encoding="utf8-lossy",
        skip_rows=1,
    ).with_row_index("line", offset=2)
    fields = pl.col("__raw").str.split("\t")
    lf = (
        raw.with_columns(__fields=fields)
        .with_columns(
            pl.col("__fields").list.get(i, null_on_oob=True).alias(c) for i, c in enumerate(columns)
        )
        .with_columns(
            __reason=pl.when(pl.col("__raw").is_null() | (pl.col("__raw").str.strip_chars() == ""))
            .then(pl.lit("blank_line"))
            .when(pl.col("__fields").list.len() != len(columns))
            .then(pl.lit("malformed_line"))
            .when(pl.col("__raw").str.contains(_REPLACEMENT, literal=True))
            .then(pl.lit("bad_utf8"))
        )
        .drop("__raw", "__fields")
    )
    return lf, columns


def _row_reason(keep: list[str], typed: set[str]) -> pl.Expr:
    """The first problem of a row (null if none): the line's own, then the field checks."""
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
    """Checked string fields -> their types: timestamp Int64, clicked Int8, empty label values
    null, item_id renamed source_item_id."""
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


def locate(path: Path, row: dict, origin: Path | None = None) -> tuple[Path, int, str]:
    """(file, line, unit) to name for a row of `path` read by `scan`: the file the user gave
    (`origin`, default `path`) and the row's line in it (its SOURCE_LINE when the table was
    converted from a text file), unit "line" for a text file, "row" for a Parquet row number."""
    if row.get(SOURCE_LINE) is not None:
        return origin or path, int(row[SOURCE_LINE]), "line"
    return origin or path, int(row["line"]), "row" if path.suffix == ".parquet" else "line"


def raise_first(
    bad: pl.DataFrame,
    path: Path,
    total: dict[str, int],
    *,
    origin: Path | None = None,
    advice: str | None = "set prepare.on_bad_rows=quarantine to drop and count them",
) -> None:
    """Raise a DataError for the first bad row of `bad` (rows of `path` as `scan` reads them),
    with the counts per reason and `advice` (None: none); it names `origin` (the file the user
    gave, default `path`)."""
    row = bad.sort("line").row(0, named=True)
    file, line, unit = locate(path, row, origin)
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(total.items()))
    detail = {
        "blank_line": "blank line",
        "malformed_line": "wrong number of tab-separated fields",
        "bad_utf8": "bytes that are not valid UTF-8",
        "missing_user": "empty user_id",
        "bad_timestamp": "timestamp is not a non-negative integer (seconds since the epoch)",
        "empty_text": "empty text",
        "bad_clicked": "clicked is not 0 or 1",
        "duplicate_event": "duplicate event (same user, timestamp and text as an earlier line)",
        "duplicate_user": f"user {row.get('user_id')!r} appears more than once",
        "unknown_user": f"user {row.get('user_id')!r} has no behaviors",
    }[row["reason"]]
    if path.suffix == ".parquet":
        shown = {k: v for k, v in row.items() if k not in ("line", SOURCE_LINE, "reason")}
        excerpt = _shorten(repr(shown))
    else:
        excerpt = _excerpt(path, line)
    raise DataError(
        file,
        line,
        f"{detail} [{row['reason']}]: {excerpt} (bad rows in this file: {counts}"
        + (f"; {advice})" if advice else ")"),
        unit,
    )


def raw_rows(path: Path, lines: list[int]) -> pl.Series:
    """The rows of `path` at `lines` (sorted, as `scan` numbers them) exactly as stored: the
    bytes of each line of a text file (without its newline), the JSON of each Parquet row
    (values as written, before any check or cast). Binary, one entry per line."""
    if path.suffix == ".parquet":
        rows = (
            pl.scan_parquet(path)
            .with_row_index("__line", offset=1)
            .filter(pl.col("__line").is_in(lines))
            .sort("__line")
            .drop("__line")
            .select(pl.struct(pl.all()).struct.json_encode().cast(pl.Binary))
            .collect()
            .to_series()
        )
        return rows.rename("raw")
    wanted, found = set(lines), {}
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            if n in wanted:
                found[n] = raw.rstrip(b"\r\n")
    return pl.Series("raw", [found.get(n, b"") for n in lines], dtype=pl.Binary)


def _shorten(text: str, width: int = 200) -> str:
    return text if len(text) <= width else text[:width] + "..."


def _excerpt(path: Path, line: int, width: int = 120) -> str:
    """The raw text of one line of a file (bad bytes shown as escapes), shortened to `width`."""
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            if n == line:
                text = raw.rstrip(b"\r\n").decode("utf-8", errors="backslashreplace")
                return repr(text if len(text) <= width else text[:width] + "...")
    return "''"
