"""Stage `prepare`: validate the raw tables, build items, user sequences and splits."""

from __future__ import annotations

from pathlib import Path

from ptum import paths
from ptum.config import Params, PrepareConfig
from ptum.data.prepare import PrepareOptions, prepare
from ptum.stages.errors import reading


def prepare_options(c: PrepareConfig) -> PrepareOptions:
    """The prepare library's options from the `prepare:` section (ctr_windows is checked at
    load: "global" is the only value that runs)."""
    return PrepareOptions(
        max_behaviors=c.max_behaviors,
        on_bad_rows=c.on_bad_rows,
        on_duplicates=c.on_duplicates,
        ctr_train_frac=c.ctr_train_frac,
        ctr_test_frac=c.ctr_test_frac,
        ctr_valid_frac=c.ctr_valid_frac,
        demo_split=c.demo_split,
        label_ratios=c.label_ratios,
        pretrain_valid_frac=c.pretrain_valid_frac,
        seed=c.seed,
        chunk_rows=c.chunk_rows,
    )


def run(p: Params, *, raw: Path = paths.RAW, out: Path = paths.PREPARED) -> dict:
    """data/raw -> data/prepared (tables, report.json); return the data report."""
    with reading(raw, writing=out):
        return prepare(raw, out, prepare_options(p.prepare))
