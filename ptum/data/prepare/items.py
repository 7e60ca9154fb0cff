"""The item table: items are keyed by text, so two source ids with one text are one item (and one
never serves as the other's negative); impressions seen as item ids."""

from __future__ import annotations

import numpy as np
import polars as pl

# The schema of the impressions table when the source has none.
NO_IMPRESSIONS = {
    "line": pl.UInt32,
    "user_id": pl.String,
    "timestamp": pl.Int64,
    "text": pl.String,
    "clicked": pl.Int8,
}


def build_items(
    behavior_texts: pl.Series, impression_texts: pl.Series, behavior_text_codes: np.ndarray
) -> tuple[pl.DataFrame, pl.Enum]:
    """Distinct texts (behaviors and impression candidates) -> item table sorted by text.

    behavior_texts: the distinct behavior texts, sorted; behavior_text_codes: (N,) each
    behavior's position in them. Returns the items (item_id, text, n_behaviors) and an Enum
    whose physical code + 1 is the item_id. item_id is 1-based so that 0 can be the padding
    item; n_behaviors counts behaviors only.
    """
    counts = np.bincount(behavior_text_codes, minlength=len(behavior_texts))
    return item_table(behavior_texts, counts, impression_texts)


def item_table(
    behavior_texts: pl.Series, counts: np.ndarray, impression_texts: pl.Series
) -> tuple[pl.DataFrame, pl.Enum]:
    """build_items from the distinct behavior texts (any order) and their (B,) behavior counts."""
    texts = pl.concat([behavior_texts, impression_texts.unique()]).unique().sort()
    enum = pl.Enum(texts)
    n_behaviors = np.zeros(len(texts), dtype=np.int64)
    n_behaviors[behavior_texts.cast(enum).to_physical().cast(pl.Int64).to_numpy()] = counts
    items = pl.DataFrame(
        {
            "item_id": np.arange(1, len(texts) + 1, dtype=np.int32),
            "text": texts,
            "n_behaviors": n_behaviors,
        }
    )
    return items, enum


def ctr_columns(imps: pl.DataFrame, user_enum: pl.Enum, item_enum: pl.Enum) -> pl.DataFrame:
    """Impressions as (line, user_id Enum, timestamp, item_id, clicked). user_id as the Enum of
    sorted user ids: sorts by it compare integers, in the same order as the strings."""
    return imps.select(
        "line",
        pl.col("user_id").cast(user_enum),
        "timestamp",
        item_id=(pl.col("text").cast(item_enum).to_physical() + 1).cast(pl.Int32),
        clicked="clicked",
    )
