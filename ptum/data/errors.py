"""The one error type for bad input data: it always names the file, the line/row and the problem."""

from __future__ import annotations

from pathlib import Path

# The range of the Int64 columns (timestamps, ids) that text sources are parsed into.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def shorten(text: str, width: int) -> str:
    """`text` cut to `width` characters (marked "...") for quoting in a message."""
    return text if len(text) <= width else text[:width] + "..."


class DataError(ValueError):
    """Bad input data.

    Args:
        path: the file that holds the bad data.
        line: 1-based line number in a text file, or row number in a Parquet file (None when the
            problem concerns the whole file, e.g. a missing column).
        problem: what is wrong, in words a user can act on.
        unit: "line" for text files, "row" for Parquet.
    """

    def __init__(self, path: str | Path, line: int | None, problem: str, unit: str = "line"):
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = (
            self.path
            if line is None
            else f"{self.path}:{line}"
            if unit == "line"
            else (f"{self.path} row {line}")
        )
        super().__init__(f"{where}: {problem}")
