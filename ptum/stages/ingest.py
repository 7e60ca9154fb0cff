"""Stage `ingest`: bring the source of params `data` into the generic format (data/raw)."""

from __future__ import annotations

from pathlib import Path

from ptum import paths
from ptum.config import Params
from ptum.data.ingest import ingest
from ptum.stages.errors import reading


def run(p: Params, *, out: Path = paths.RAW) -> dict:
    """Write the generic tables and manifest.json into `out`; return the manifest."""
    d = p.data
    with reading(*([Path(d.path)] if d.path else [])):
        return ingest(
            source=d.source,
            path=d.path,
            out_dir=out,
            size=d.size,
            seed=d.seed,
            click_threshold=d.click_threshold,
            age_edges=d.age_edges,
            movielens_variant=d.movielens_variant,
        )
