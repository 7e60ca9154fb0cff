"""Splits: the global CTR time windows, the seeded train/valid/test draws and the nested
label-ratio subsets (`train_20 ⊂ train_50 ⊂ train_100`). Pure functions on DataFrames; also used
by fine-tuning, which re-draws a split per repeat."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import polars as pl

# Order of the CTR impressions when they get their windows and their train/valid draw.
WINDOW_ORDER = ("timestamp", "user_id", "item_id", "line")


def ratio_column(r: float) -> str:
    """Column name of the nested training subset with ratio r (0.2 -> 'train_20')."""
    return f"train_{round(r * 100)}"


def global_cutoffs(
    n: int, kth: Callable[[int], int], train_frac: float, test_frac: float
) -> tuple[int | None, int | None]:
    """(t_train, t_test) of `global` windows over n impressions; kth(k) is the k-th smallest
    timestamp (0-based). The CTR-test window starts at the timestamp of rank n - ceil(n *
    test_frac), the CTR-train window ceil(n * train_frac) ranks earlier."""
    if n == 0:
        return None, None
    return (
        int(kth(max(n - math.ceil(n * (test_frac + train_frac)), 0))),
        int(kth(max(n - math.ceil(n * test_frac), 0))),
    )


def global_windows(
    impressions: pl.DataFrame, t_train: int | None, t_test: int | None
) -> pl.DataFrame:
    """Add `window` from global cut-offs: ties go to the later window (null: no impressions)."""
    if t_test is None:
        return impressions.with_columns(window=pl.lit(None, dtype=pl.String))
    return impressions.with_columns(
        window=pl.when(pl.col("timestamp") >= t_test)
        .then(pl.lit("test"))
        .when(pl.col("timestamp") >= t_train)
        .then(pl.lit("train"))
        .otherwise(pl.lit("history"))
    )


def ctr_cutoffs(
    impressions: pl.DataFrame, train_frac: float, test_frac: float
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Assign each impression a window and return (impressions + window, the cut-offs).

    Windows by global time rank: the last `test_frac` of all impressions are the CTR-test
    window, the `train_frac` before them the CTR-train window, the rest history (not CTR
    samples). One cut-off timestamp for everyone (ties go to the later window), so the test
    window is the future of every user. Cut-offs: one row (t_train, t_test).
    """
    ordered = impressions.sort(*WINDOW_ORDER)
    ts = ordered["timestamp"].to_numpy()
    t_train, t_test = global_cutoffs(ordered.height, ts.__getitem__, train_frac, test_frac)
    cut = pl.DataFrame(
        {"t_train": [t_train], "t_test": [t_test]},
        schema={"t_train": pl.Int64, "t_test": pl.Int64},
    )
    return global_windows(ordered, t_train, t_test), cut


def shuffled_rank(keys: list[str], seed: int) -> np.ndarray:
    """A seeded random rank (0..n-1) for each key, independent of input order."""
    order = np.argsort(np.asarray(keys, dtype=object), kind="stable")
    perm = np.random.default_rng(seed).permutation(len(keys))
    rank = np.empty(len(keys), dtype=np.int64)
    rank[order] = perm
    return rank


def split_labels(
    labels: pl.DataFrame, split: tuple[float, float, float], ratios: tuple[float, ...], seed: int
) -> pl.DataFrame:
    """Add `split` (train/valid/test by seeded shuffle) and nested `train_<r>` subset flags."""
    n = labels.height
    rank = shuffled_rank(labels["user_id"].to_list(), seed)
    n_train = int(round(split[0] * n))
    n_valid = int(round(split[1] * n))
    which = np.where(rank < n_train, "train", np.where(rank < n_train + n_valid, "valid", "test"))
    out = labels.with_columns(split=pl.Series(which, dtype=pl.String))
    # Train users ranked 0..n_train-1: the first round(r * n_train) form subset r, so nested.
    flags = {ratio_column(r): (rank < int(round(r * n_train))) for r in ratios}
    return out.with_columns(**{k: pl.Series(v) for k, v in flags.items()})


def split_impressions(
    imps: pl.DataFrame, valid_frac: float, ratios: tuple[float, ...], seed: int
) -> pl.DataFrame:
    """Train-window impressions -> train/valid (seeded, by impression), nested train subsets."""
    is_train = (imps["window"] == "train").to_numpy()
    rng = np.random.default_rng(seed)
    u = rng.random(imps.height)
    n_train_window = int(is_train.sum())
    # Rank train-window impressions by u; the first valid share is validation.
    order = np.argsort(np.where(is_train, u, 2.0), kind="stable")
    rank = np.empty(imps.height, dtype=np.int64)
    rank[order] = np.arange(imps.height)
    n_valid = int(round(valid_frac * n_train_window))
    window = np.where(is_train & (rank < n_valid), "valid", imps["window"].to_numpy())
    n_train = n_train_window - n_valid
    train_rank = rank - n_valid
    out = imps.with_columns(window=pl.Series(window, dtype=pl.String))
    flags = {
        ratio_column(r): (window == "train") & (train_rank < int(round(r * n_train)))
        for r in ratios
    }
    return out.with_columns(**{k: pl.Series(v) for k, v in flags.items()})


def user_cut(users: pl.Series, cut: pl.DataFrame) -> pl.DataFrame:
    """The global cut-offs (t_train, t_test) repeated for each of `users`, in their order.

    Users without impressions are cut at the same instant, so nothing at or after the global
    test window reaches pre-training."""
    return pl.select(user_id=users).join(cut, how="cross")
