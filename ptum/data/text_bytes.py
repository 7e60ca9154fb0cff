"""Byte-level checks of input text: UTF-8 validity (a lossy decode shows bad bytes as U+FFFD,
but U+FFFD may also be written as itself) and the control byte 0x1F, which the TSV reader of
`ptum.data.generic` uses to read whole lines."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import polars as pl

REPLACEMENT = "\ufffd"  # what a lossy UTF-8 decode puts in place of bad bytes
# The byte the TSV reader reads whole lines with (as the CSV separator): a line holding it is
# flagged instead of read.
CONTROL = b"\x1f"
CONTROL_DETAIL = "contains the control byte 0x1F, which ptum cannot read: remove it"


def utf8_text(s: pl.Series) -> pl.Series:
    """Binary values as strings; a value that is not UTF-8 decoded with U+FFFD for its bad bytes
    (`not_utf8` flags its row)."""
    try:
        return s.cast(pl.String)
    except pl.exceptions.ComputeError:
        return pl.Series(
            s.name,
            [None if v is None else v.decode("utf-8", "replace") for v in s],
            dtype=pl.String,
        )


def not_utf8(s: pl.Series) -> pl.Series:
    """For each binary value: whether it is not valid UTF-8 (null: no)."""
    try:
        s.cast(pl.String)
        return pl.Series(s.name, [False] * len(s), dtype=pl.Boolean)
    except pl.exceptions.ComputeError:
        return pl.Series(s.name, [v is not None and not is_utf8(v) for v in s], dtype=pl.Boolean)


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def lines_with(path: Path, byte: bytes) -> set[int]:
    """The 1-based lines of `path` that hold `byte`: one pass at memory speed when none does."""
    buf = bytearray(1 << 20)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buf):
            if buf.find(byte, 0, n) >= 0:
                break
        else:
            return set()
    with path.open("rb") as f:
        return {k for k, raw in enumerate(f, start=1) if byte in raw}


def not_utf8_lines(path: Path) -> pl.Expr:
    """True for a line of `path` (as `_scan_tsv` reads it: `line`, `__raw`) that holds bytes
    that are not UTF-8. The lossy decode shows them as U+FFFD, but U+FFFD may also be written
    as itself: a line showing it is looked up among the lines a strict decode refuses, which
    are found (in one pass over the file) only once a line shows it."""
    refused: list[set[int]] = []
    lock = threading.Lock()

    def check(columns: Sequence[pl.Series]) -> pl.Series:
        line, shows = columns
        if not shows.any():  # the usual batch: nothing to look up
            return shows
        with lock:
            if not refused:
                refused.append(invalid_utf8_lines(path))
        return shows & line.is_in(pl.Series(sorted(refused[0]), dtype=line.dtype).implode())

    shows = pl.col("__raw").str.contains(REPLACEMENT, literal=True)
    return pl.map_batches(["line", shows], check, pl.Boolean, is_elementwise=True)


def invalid_utf8_lines(path: Path) -> set[int]:
    """The 1-based lines of `path` that a strict UTF-8 decode refuses (blocks of whole lines are
    decoded at once; only a block that fails is decoded line by line)."""
    bad: set[int] = set()
    first, tail = 1, b""
    with path.open("rb") as f:
        while True:
            block = f.read(1 << 24)
            data = tail + block
            cut = data.rfind(b"\n") + 1 if block else len(data)
            data, tail = data[:cut], data[cut:]
            if not is_utf8(data):
                bad.update(first + k for k, raw in enumerate(data.split(b"\n")) if not is_utf8(raw))
            first += data.count(b"\n")
            if not block:
                return bad
