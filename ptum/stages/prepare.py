"""Stage `prepare`: validate the raw tables, build items, user sequences and splits."""

from __future__ import annotations

from pathlib import Path

from ptum import paths
from ptum.config import Params
from ptum.data.prepare import prepare
from ptum.stages.errors import reading


def run(p: Params, *, raw: Path = paths.RAW, out: Path = paths.PREPARED) -> dict:
    """data/raw -> data/prepared (tables, report.json); return the data report."""
    with reading(raw, writing=out):
        return prepare(raw, out, p.prepare)
