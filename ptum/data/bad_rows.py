"""Naming a bad row of an input table for the user: the file and line (or Parquet row) they gave,
what is wrong with it and an excerpt of it as stored (`ptum.data.generic.scan` reads the rows)."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from ptum.data.errors import DataError, shorten
from ptum.data.generic import SOURCE_LINE
from ptum.data.text_bytes import CONTROL_DETAIL


def locate(path: Path, row: dict, origin: Path | None = None) -> tuple[Path, int, str]:
    """(file, line, unit) to name for a row of `path` read by `scan`: the file the user gave
    (`origin`, default `path`) and the row's line in it (its SOURCE_LINE when the table was
    converted from a text file), unit "line" for a text file, "row" for a Parquet row number."""
    if row.get(SOURCE_LINE) is not None:
        return origin or path, int(row[SOURCE_LINE]), "line"
    return origin or path, int(row["line"]), "row" if path.suffix == ".parquet" else "line"


_DETAIL = {
    "blank_line": "blank line",
    "control_byte": CONTROL_DETAIL,
    "malformed_line": "wrong number of tab-separated fields",
    "bad_utf8": "bytes that are not valid UTF-8",
    "missing_user": "empty user_id",
    "bad_timestamp": "timestamp is not a non-negative integer (seconds since the epoch)",
    "empty_text": "empty text",
    "bad_clicked": "clicked is not 0 or 1",
    "duplicate_event": "duplicate event (same user, timestamp and text as an earlier line)",
}


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
        **_DETAIL,
        "duplicate_user": f"user {row.get('user_id')!r} appears more than once",
        "unknown_user": f"user {row.get('user_id')!r} has no behaviors",
    }[row["reason"]]
    if path.suffix == ".parquet":
        shown = {k: v for k, v in row.items() if k not in ("line", SOURCE_LINE, "reason")}
        excerpt = shorten(repr(shown), 200)
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
        lf = pl.scan_parquet(path)
        schema = lf.collect_schema()
        index = "__line" + "_" * max((len(c) for c in schema.names()), default=0)  # a new name
        # Polars cannot write binary values as JSON: bytes that are not UTF-8 as escapes.
        binary = [
            pl.col(c).map_batches(_escaped_text, pl.String, is_elementwise=True)
            for c, t in schema.items()
            if t == pl.Binary
        ]
        rows = (
            lf.with_row_index(index, offset=1)
            .filter(pl.col(index).is_in(lines))
            .sort(index)
            .drop(index)
            .with_columns(binary)
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


def _escaped_text(s: pl.Series) -> pl.Series:
    return pl.Series(
        s.name,
        [None if v is None else v.decode("utf-8", "backslashreplace") for v in s],
        dtype=pl.String,
    )


def _excerpt(path: Path, line: int, width: int = 120) -> str:
    """The raw text of one line of a file (bad bytes shown as escapes), shortened to `width`."""
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            if n == line:
                text = raw.rstrip(b"\r\n").decode("utf-8", errors="backslashreplace")
                return repr(shorten(text, width))
    return "''"
