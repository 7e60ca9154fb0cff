"""Stage `prepare`: validate the raw tables, build items, user sequences and splits."""

from __future__ import annotations

from pathlib import Path

from ptum import paths
from ptum.config import Params, to_dict
from ptum.data.prepare import PrepareOptions, prepare
from ptum.stages.errors import reading


def run(p: Params, *, raw: Path = paths.RAW, out: Path = paths.PREPARED) -> dict:
    """data/raw -> data/prepared (tables, report.json); return the data report."""
    # to_dict turns tuples into lists; the options keep the config's tuples.
    opts = PrepareOptions(
        **to_dict(p.prepare)
        | {"demo_split": p.prepare.demo_split, "label_ratios": p.prepare.label_ratios}
    )
    with reading(raw, writing=out):
        return prepare(raw, out, opts)
