"""`prepare`: builds the prepared directory. Validates and builds the items and sequences (in
memory, or in chunks of whole users for a log over `chunk_rows`), then draws the splits and writes
the outputs, the data report and the manifest of their SHA-256s (which every reader checks:
`ptum.data.verified`) into a scratch directory that replaces `out_dir` only once complete."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import polars as pl

from ptum.data.prepare.chunked import prepare_chunked
from ptum.data.prepare.in_memory import Core, prepare_in_memory
from ptum.data.prepare.options import PrepareOptions
from ptum.data.prepare.report import complete_report, headline_metrics
from ptum.data.prepare.sources import find_sources
from ptum.data.prepare.splits import shuffled_rank, split_impressions, split_labels
from ptum.data.verified import MANIFEST, write_manifest
from ptum.io import atomic_dir


def prepare(raw_dir: Path, out_dir: Path, opts: PrepareOptions) -> dict:
    """Build `out_dir` from `raw_dir`; returns the data report (also written to
    out_dir/report.json).

    A behaviors table of at most `opts.chunk_rows` rows is processed in memory; a bigger one
    streams through in chunks of whole users (`prepare_chunked`), with the same outputs.
    """
    sources = find_sources(raw_dir)
    report: dict = {}
    n_chunks = max(1, math.ceil(_row_count(sources.behaviors.path) / opts.chunk_rows))
    # The previous output is replaced only once everything is written: no half-written outputs.
    with atomic_dir(out_dir, marker=MANIFEST, stage="prepare") as tmp:
        if n_chunks == 1:
            core = prepare_in_memory(sources, tmp, opts, report)
        else:
            core = prepare_chunked(sources, tmp, opts, report, n_chunks)
            shutil.rmtree(tmp / "chunks")
        _finish(core, tmp, opts, report)
        write_manifest(tmp, "prepare")  # last: the SHA-256 of every file above
    return report


def _row_count(path: Path) -> int:
    """Rows of a Parquet file (from its metadata) or lines of a TSV file."""
    if path.suffix == ".parquet":
        return pl.scan_parquet(path).select(pl.len()).collect().item()
    n = 0
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            n += block.count(b"\n")
    return n


def _finish(core: Core, tmp: Path, opts: PrepareOptions, report: dict) -> None:
    """Splits, users.parquet, impressions.parquet, labels.parquet, the data report and its
    headline metrics."""
    imps_out = split_impressions(core.windowed, opts.ctr_valid_frac, opts.label_ratios, opts.seed)
    imps_out = (
        imps_out.sort("user_id", "timestamp", "line")
        .drop("line")
        .with_columns(pl.col("user_id").cast(pl.String))
    )
    imps_out.write_parquet(tmp / "impressions.parquet")

    labels_out = split_labels(core.labels, opts.demo_split, opts.label_ratios, opts.seed)
    labels_out.sort("user_id").write_parquet(tmp / "labels.parquet")

    users_out = _users(core, opts)
    users_out.write_parquet(tmp / "users.parquet")

    outputs = {"impressions": imps_out, "labels": labels_out, "users": users_out}
    complete_report(report, core, outputs, opts)
    (tmp / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    metrics = headline_metrics(report)
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")


def _users(core: Core, opts: PrepareOptions) -> pl.DataFrame:
    """users.parquet: behaviors per user and the seeded pre-training train/valid split of the
    users with at least 2 behaviors before their CTR-test window (null for the others)."""
    eligible = core.before_test.filter(pl.col("n_total") >= 2)["user_id"].to_list()
    rank = shuffled_rank(eligible, opts.seed + 1)
    n_valid = int(round(opts.pretrain_valid_frac * len(eligible)))
    pre_split = pl.DataFrame(
        {"user_id": eligible, "pretrain_split": np.where(rank < n_valid, "valid", "train")},
        schema={"user_id": pl.String, "pretrain_split": pl.String},
    )
    n_per_user = pl.DataFrame(
        {"user_id": core.users, "n_behaviors": core.n_behaviors.astype(np.uint32)}
    )
    return n_per_user.join(pre_split, on="user_id", how="left", maintain_order="left")
