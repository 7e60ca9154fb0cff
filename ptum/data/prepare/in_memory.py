"""Prepare on a log that fits in memory: validate every table whole, then build the items and
the sequence views. `Core` is what this runner and the chunked one hand to the splits and the
report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from ptum.data.prepare import views
from ptum.data.prepare.items import NO_IMPRESSIONS, build_items, ctr_columns
from ptum.data.prepare.options import PrepareOptions
from ptum.data.prepare.sources import Sources
from ptum.data.prepare.splits import ctr_cutoffs, user_cut
from ptum.data.prepare.validate import no_table, read_labels, validate_table


@dataclass
class Core:
    """What both ways of preparing hand to `build._finish` (items and sequences written)."""

    items: pl.DataFrame
    users: pl.Series  # (U,) sorted ids of the users with a valid behavior
    n_behaviors: np.ndarray  # (U,) valid behaviors per user
    before_test: pl.DataFrame  # user_id, n_total of each user's before_test view
    windowed: pl.DataFrame  # CTR-train/test-window impressions in WINDOW_ORDER
    n_history: int  # impressions before the CTR-train window (not CTR samples)
    labels: pl.DataFrame
    label_cols: list[str]


def prepare_in_memory(sources: Sources, tmp: Path, opts: PrepareOptions, report: dict) -> Core:
    """Validate every table whole, then build the items and sequences."""
    qdir = tmp / "quarantine"
    # Behaviors are needed as codes only (user, item): their strings are not copied.
    behaviors, report["behaviors"], _, codes = validate_table(
        sources.behaviors, "behaviors", opts, qdir, good_columns=["line", "timestamp"]
    )
    user_codes, users = codes["user_id"]
    user_enum = pl.Enum(users)
    if sources.impressions is not None:
        imps, report["impressions"], _, _ = validate_table(
            sources.impressions, "impressions", opts, qdir, known_users=user_enum
        )
    else:
        imps, report["impressions"] = pl.DataFrame(schema=NO_IMPRESSIONS), no_table()
    labels, label_cols = read_labels(sources.labels, opts, qdir, user_enum, report)

    text_codes, texts = codes["text"]
    items, item_enum = build_items(texts, imps["text"], text_codes)
    items.write_parquet(tmp / "items.parquet")
    item_of_code = texts.cast(item_enum).to_physical().cast(pl.Int32).to_numpy() + 1
    beh = behaviors.select("line", "timestamp").with_columns(
        user=pl.Series(user_codes, dtype=pl.UInt32), item_id=pl.Series(item_of_code[text_codes])
    )
    del behaviors, text_codes
    windowed, cut = ctr_cutoffs(
        ctr_columns(imps, user_enum, item_enum),
        opts.ctr_train_frac,
        opts.ctr_test_frac,
    )
    labeled = users.is_in(labels["user_id"].implode()).to_numpy()
    seqs = views.sequences(beh, users, user_cut(users, cut), labeled, opts.max_behaviors)
    # Row groups of SEQUENCE_ROW_GROUP rows: compressed in parallel and with bounded buffers on
    # big logs. A file with fewer rows is one row group either way, byte-identical to the
    # default writer's (DVC hashes bytes; the committed result sets stay valid).
    seqs.write_parquet(tmp / "sequences.parquet", row_group_size=views.SEQUENCE_ROW_GROUP)
    return Core(
        items=items,
        users=users,
        n_behaviors=np.bincount(user_codes, minlength=len(users)),
        before_test=seqs.filter(pl.col("view") == "before_test").select("user_id", "n_total"),
        windowed=windowed.filter(pl.col("window") != "history"),
        n_history=int((windowed["window"] == "history").sum()),
        labels=labels,
        label_cols=label_cols,
    )
