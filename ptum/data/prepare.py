"""Stage `prepare`: validate the generic tables, build the item table, user sequences and splits.

Outputs (in `out_dir`):
    items.parquet        item_id i32 (1..N; 0 is the padding item), text, n_behaviors
    sequences.parquet    user_id, view, item_ids list[i32], timestamps list[i64], gaps list[i64],
                         n_total (behaviors in the view before truncation to max_behaviors)
    users.parquet        user_id, n_behaviors, pretrain_split ("train" | "valid" | null)
    labels.parquet       user_id, <label columns>, split ("train"|"valid"|"test"), train_<r>...
    impressions.parquet  user_id, timestamp, item_id, clicked, window ("train"|"valid"|"test"),
                         train_<r>... (nested training subsets of the train window)
    report.json          the data report (rows read = kept + dropped per reason, always)
    quarantine/<table>.parquet   bad rows with their line and reason (quarantine mode only)

Sequence views (each time-ordered, the last `max_behaviors` kept, gaps = seconds since the
previous behavior, computed before truncation so the first kept gap is true):
    full          every behavior of a labeled user: the input of the demographic tasks
    before_test   behaviors strictly before the user's CTR-test window: the pre-training corpus
                  of every user, and the history of CTR-test impressions
    before_train  behaviors strictly before the CTR-train window: history of CTR-train/valid

So the pre-training corpus never contains a test impression (nor, for MovieLens, where ratings are
both behaviors and impressions, the test ratings themselves) and never any label.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from ptum.data import generic
from ptum.data.errors import DataError

VIEWS = ("full", "before_test", "before_train")


@dataclass(frozen=True)
class PrepareOptions:
    """Explicit arguments of `prepare` (the CLI builds them from params.yaml)."""

    max_behaviors: int = 100
    on_bad_rows: str = "error"
    ctr_windows: str = "global"
    ctr_train_frac: float = 0.1
    ctr_test_frac: float = 0.1
    ctr_valid_frac: float = 0.1
    demo_split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    label_ratios: tuple[float, ...] = (0.2, 0.5, 1.0)
    pretrain_valid_frac: float = 0.05
    seed: int = 13

    def __post_init__(self) -> None:
        if self.max_behaviors < 2:
            raise ValueError("prepare.max_behaviors must be >= 2")
        if abs(sum(self.demo_split) - 1.0) > 1e-6 or min(self.demo_split) < 0:
            raise ValueError(f"prepare.demo_split must be 3 shares summing to 1, got {self.demo_split}")
        if not all(0 < r <= 1 for r in self.label_ratios):
            raise ValueError(f"prepare.label_ratios must lie in (0, 1], got {self.label_ratios}")
        if not (0 < self.ctr_test_frac < 1 and 0 < self.ctr_train_frac < 1
                and self.ctr_train_frac + self.ctr_test_frac <= 1):
            raise ValueError("prepare.ctr_train_frac and ctr_test_frac must be in (0, 1) and sum <= 1")


def ratio_column(r: float) -> str:
    """Column name of the nested training subset with ratio r (0.2 -> 'train_20')."""
    return f"train_{round(r * 100)}"


# ---------------------------------------------------------------- validation


def _validate(path: Path, table: str, opts: PrepareOptions, quarantine_dir: Path,
              known_users: pl.LazyFrame | None = None) -> tuple[pl.LazyFrame, dict, list[str]]:
    """Validate one table; return (good rows, counts, label columns). Raises or quarantines."""
    lf, label_cols = generic.scan(path, table)
    if table == "labels":
        lf = generic.flag_duplicates(lf, ["user_id"], "duplicate_user")
    else:
        keys = ["user_id", "timestamp", "text"]
        if "source_item_id" in lf.collect_schema().names():
            keys.append("source_item_id")
        lf = generic.flag_duplicates(lf, keys, "duplicate_event")
    if known_users is not None:
        lf = lf.join(known_users.with_columns(__known=pl.lit(True)), on="user_id", how="left")
        lf = lf.with_columns(
            reason=pl.when(pl.col("reason").is_null() & pl.col("__known").is_null())
            .then(pl.lit("unknown_user")).otherwise(pl.col("reason"))
        ).drop("__known")
    # Materialise once: every later step (counts, bad rows, good rows) reads this frame.
    df = lf.collect(engine="streaming")
    counts_df = df.group_by("reason").len().to_dicts()
    dropped = {d["reason"]: int(d["len"]) for d in counts_df if d["reason"] is not None}
    kept = sum(int(d["len"]) for d in counts_df if d["reason"] is None)
    # Blank lines are not data rows: count them apart so rows_read means data rows.
    blank = dropped.pop("blank_line", 0)
    counts = {"file": str(path), "rows_read": kept + sum(dropped.values()), "rows_kept": kept,
              "rows_dropped": dropped, "blank_lines_skipped": blank}
    if dropped:
        bad = df.filter(pl.col("reason").is_not_null() & (pl.col("reason") != "blank_line"))
        if opts.on_bad_rows == "error":
            generic.raise_first(bad, path, dropped)
        quarantine_dir.mkdir(parents=True, exist_ok=True)
        bad.sort("line").write_parquet(quarantine_dir / f"{table}.parquet")
    good = df.filter(pl.col("reason").is_null()).drop("reason").sort("line")
    if good.height == 0 and table != "impressions":
        raise DataError(path, None, "no valid rows", "row" if path.suffix == ".parquet" else "line")
    return good.lazy(), counts, label_cols


# ---------------------------------------------------------------- pure transforms


def build_items(behavior_texts: pl.LazyFrame, impression_texts: pl.LazyFrame) -> pl.LazyFrame:
    """Distinct texts (behaviors and impression candidates) -> item table sorted by text.

    item_id is 1-based so that 0 can be the padding item; n_behaviors counts behaviors only.
    """
    counts = behavior_texts.group_by("text").agg(n_behaviors=pl.len())
    texts = pl.concat([behavior_texts.select("text"), impression_texts.select("text")]).unique()
    return (
        texts.join(counts, on="text", how="left")
        .with_columns(pl.col("n_behaviors").fill_null(0).cast(pl.Int64))
        .sort("text")
        .with_row_index("item_id", offset=1)
        .with_columns(pl.col("item_id").cast(pl.Int32))
    )


def ctr_cutoffs(impressions: pl.DataFrame, mode: str, train_frac: float,
                test_frac: float) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Assign each impression a window and return (impressions + window, per-user cut-offs).

    Windows by time rank: the last `test_frac` of impressions are the CTR-test window, the
    `train_frac` before them the CTR-train window, the rest history (not CTR samples). `global`
    ranks all impressions together (one cut-off timestamp for everyone, ties go to the later
    window); `per_user` ranks each user's own impressions. Cut-offs: t_train / t_test = first
    timestamp of the user's window (null when the user has no such window).
    """
    ordered = impressions.sort("timestamp", "user_id", "item_id", "line")
    n = ordered.height
    if mode == "global":
        ts = ordered["timestamp"].to_numpy()
        t_test = int(ts[max(n - math.ceil(n * test_frac), 0)]) if n else None
        t_train = int(ts[max(n - math.ceil(n * (test_frac + train_frac)), 0)]) if n else None
        windowed = ordered.with_columns(
            window=pl.when(pl.col("timestamp") >= t_test).then(pl.lit("test"))
            .when(pl.col("timestamp") >= t_train).then(pl.lit("train"))
            .otherwise(pl.lit("history"))
        ) if n else ordered.with_columns(window=pl.lit(None, dtype=pl.String))
        cut = pl.DataFrame({"t_train": [t_train], "t_test": [t_test]},
                           schema={"t_train": pl.Int64, "t_test": pl.Int64})
        return windowed, cut
    rank = pl.int_range(pl.len()).over("user_id")
    size = pl.len().over("user_id")
    windowed = ordered.with_columns(
        window=pl.when(rank >= size - (size * test_frac).ceil()).then(pl.lit("test"))
        .when(rank >= size - (size * (test_frac + train_frac)).ceil()).then(pl.lit("train"))
        .otherwise(pl.lit("history"))
    )
    cut = windowed.group_by("user_id").agg(
        t_train=pl.col("timestamp").filter(pl.col("window") == "train").min(),
        t_test=pl.col("timestamp").filter(pl.col("window") == "test").min(),
    )
    return windowed, cut


def sequences(behaviors: pl.LazyFrame, cut: pl.LazyFrame, labeled: pl.LazyFrame,
              max_behaviors: int) -> pl.LazyFrame:
    """Per-user time-ordered views (see module docstring), truncated to the last max_behaviors.

    behaviors: user_id, timestamp, item_id (+ line for a stable order of same-second events).
    cut: user_id, t_train, t_test (null = no such window for that user).
    """
    labeled_users = labeled.select("user_id").unique().with_columns(__labeled=pl.lit(True))
    # Materialised once and shared by the three views below (each would otherwise re-sort).
    ordered = (
        behaviors.sort("user_id", "timestamp", "line")
        .with_columns(gap=(pl.col("timestamp") - pl.col("timestamp").shift(1).over("user_id"))
                      .fill_null(0).clip(lower_bound=0))
        .join(cut, on="user_id", how="left")
        .join(labeled_users, on="user_id", how="left")
        .collect()
        .lazy()
    )

    def view(name: str, keep: pl.Expr, users: pl.Expr) -> pl.LazyFrame:
        return (
            ordered.filter(keep & users)
            .group_by("user_id", maintain_order=False)
            .agg(
                # Sort inside the aggregation: group_by does not promise to keep row order.
                *(pl.col(c).sort_by("timestamp", "line").tail(max_behaviors).alias(a)
                  for c, a in (("item_id", "item_ids"), ("timestamp", "timestamps"), ("gap", "gaps"))),
                n_total=pl.len(),
            )
            .with_columns(view=pl.lit(name))
        )

    full = view("full", pl.lit(True), pl.col("__labeled").is_not_null())
    before_test = view("before_test", pl.col("t_test").is_null()
                       | (pl.col("timestamp") < pl.col("t_test")), pl.lit(True))
    before_train = view("before_train", pl.col("timestamp") < pl.col("t_train"),
                        pl.col("t_train").is_not_null())
    cols = ["user_id", "view", "item_ids", "timestamps", "gaps", "n_total"]
    return pl.concat([v.select(cols) for v in (full, before_test, before_train)]).sort(
        "view", "user_id"
    )


def _shuffled_rank(keys: list[str], seed: int) -> np.ndarray:
    """A seeded random rank (0..n-1) for each key, independent of input order."""
    order = np.argsort(np.asarray(keys, dtype=object), kind="stable")
    perm = np.random.default_rng(seed).permutation(len(keys))
    rank = np.empty(len(keys), dtype=np.int64)
    rank[order] = perm
    return rank


def split_labels(labels: pl.DataFrame, split: tuple[float, float, float],
                 ratios: tuple[float, ...], seed: int) -> pl.DataFrame:
    """Add `split` (train/valid/test by seeded shuffle) and nested `train_<r>` subset flags."""
    n = labels.height
    rank = _shuffled_rank(labels["user_id"].to_list(), seed)
    n_train = int(round(split[0] * n))
    n_valid = int(round(split[1] * n))
    which = np.where(rank < n_train, "train", np.where(rank < n_train + n_valid, "valid", "test"))
    out = labels.with_columns(split=pl.Series(which, dtype=pl.String))
    # Train users ranked 0..n_train-1: the first round(r * n_train) form subset r, so nested.
    flags = {ratio_column(r): (rank < int(round(r * n_train))) for r in ratios}
    return out.with_columns(**{k: pl.Series(v) for k, v in flags.items()})


def split_impressions(imps: pl.DataFrame, valid_frac: float, ratios: tuple[float, ...],
                      seed: int) -> pl.DataFrame:
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
    flags = {ratio_column(r): (window == "train") & (train_rank < int(round(r * n_train)))
             for r in ratios}
    return out.with_columns(**{k: pl.Series(v) for k, v in flags.items()})


def _distribution(values: pl.Series) -> dict[str, float]:
    if values.len() == 0:
        return {}
    q = {f"p{int(p * 100)}": float(values.quantile(p, "nearest")) for p in (0.1, 0.25, 0.5, 0.75, 0.9)}
    return {"min": float(values.min()), **q, "mean": round(float(values.mean()), 3),
            "max": float(values.max())}


# ---------------------------------------------------------------- the stage


def prepare(raw_dir: Path, out_dir: Path, opts: PrepareOptions) -> dict:
    """Run the whole stage; returns the data report (also written to out_dir/report.json)."""
    paths = {t: generic.find_table(raw_dir, t) for t in ("behaviors", "labels", "impressions")}
    if paths["behaviors"] is None:
        raise DataError(raw_dir, None, "no behaviors table (behaviors.parquet or behaviors.tsv)")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    qdir = tmp / "quarantine"
    report: dict = {}

    behaviors, report["behaviors"], _ = _validate(paths["behaviors"], "behaviors", opts, qdir)
    users = behaviors.select("user_id").unique()
    if paths["impressions"] is not None:
        imps, report["impressions"], _ = _validate(paths["impressions"], "impressions", opts, qdir,
                                                   known_users=users)
    else:
        imps = pl.LazyFrame(schema={"line": pl.UInt32, "user_id": pl.String,
                                    "timestamp": pl.Int64, "text": pl.String, "clicked": pl.Int8})
        report["impressions"] = {"file": None, "rows_read": 0, "rows_kept": 0, "rows_dropped": {}}
    if paths["labels"] is not None:
        labels_lf, report["labels"], label_cols = _validate(paths["labels"], "labels", opts, qdir,
                                                            known_users=users)
    else:
        labels_lf, label_cols = pl.LazyFrame(schema={"line": pl.UInt32, "user_id": pl.String}), []
        report["labels"] = {"file": None, "rows_read": 0, "rows_kept": 0, "rows_dropped": {}}

    items = build_items(behaviors.select("text"), imps.select("text")).collect()
    items.write_parquet(tmp / "items.parquet")
    ids = items.lazy().select("text", "item_id")
    beh = behaviors.join(ids, on="text", how="left").select("line", "user_id", "timestamp", "item_id")
    imps = imps.join(ids, on="text", how="left")

    windowed, cut = ctr_cutoffs(
        imps.select("line", "user_id", "timestamp", "item_id", "clicked").collect(),
        opts.ctr_windows, opts.ctr_train_frac, opts.ctr_test_frac,
    )
    if opts.ctr_windows == "global":
        # One cut-off for everyone: users without impressions are cut at the same instant, so
        # nothing at or after the global test window reaches pre-training.
        cut = users.collect().join(cut, how="cross")
    labels_df = labels_lf.drop("line").collect()
    seqs = sequences(beh, cut.lazy(), labels_df.lazy(), opts.max_behaviors)
    seqs.sink_parquet(tmp / "sequences.parquet")

    windowed_df = windowed.filter(pl.col("window") != "history")
    imps_out = split_impressions(windowed_df, opts.ctr_valid_frac, opts.label_ratios, opts.seed)
    seq_counts = pl.scan_parquet(tmp / "sequences.parquet").select("user_id", "view", "n_total")
    imps_out = imps_out.sort("user_id", "timestamp", "line").drop("line")
    imps_out.write_parquet(tmp / "impressions.parquet")

    labels_out = split_labels(labels_df, opts.demo_split, opts.label_ratios, opts.seed)
    labels_out.sort("user_id").write_parquet(tmp / "labels.parquet")

    before_test = seq_counts.filter(pl.col("view") == "before_test").collect()
    eligible = before_test.filter(pl.col("n_total") >= 2)["user_id"].to_list()
    rank = _shuffled_rank(eligible, opts.seed + 1)
    n_valid = int(round(opts.pretrain_valid_frac * len(eligible)))
    pre_split = pl.DataFrame({"user_id": eligible,
                              "pretrain_split": np.where(rank < n_valid, "valid", "train")},
                             schema={"user_id": pl.String, "pretrain_split": pl.String})
    n_per_user = beh.group_by("user_id").agg(n_behaviors=pl.len()).collect()
    users_out = n_per_user.join(pre_split, on="user_id", how="left").sort("user_id")
    users_out.write_parquet(tmp / "users.parquet")

    # ---- report
    window_counts = dict(imps_out.group_by("window").len().iter_rows())
    report["behaviors"].update(
        users=users_out.height, items=items.height,
        items_from_behaviors=int((items["n_behaviors"] > 0).sum()),
        behaviors_per_user=_distribution(users_out["n_behaviors"]),
        truncated_users=int((before_test["n_total"] > opts.max_behaviors).sum()),
    )
    report["impressions"].update(
        windows={"history_not_used": int((windowed["window"] == "history").sum()),
                 **{k: int(v) for k, v in sorted(window_counts.items())}},
        click_rate={w: round(float(imps_out.filter(pl.col("window") == w)["clicked"].mean() or 0), 4)
                    for w in ("train", "valid", "test")},
        subsets={ratio_column(r): int(imps_out[ratio_column(r)].sum()) for r in opts.label_ratios},
    )
    report["labels"].update(
        label_columns=label_cols,
        splits={k: int(v) for k, v in sorted(dict(labels_out.group_by("split").len().iter_rows()).items())},
        subsets={ratio_column(r): int(labels_out[ratio_column(r)].sum()) for r in opts.label_ratios},
        balance={c: {str(k): int(v) for k, v in sorted(
            labels_out.group_by(c).len().iter_rows(), key=lambda kv: str(kv[0]))}
            for c in label_cols},
    )
    report["pretrain"] = {"users": len(eligible), "valid_users": n_valid,
                          "behaviors_before_test": int(before_test["n_total"].sum())}
    for t in ("behaviors", "labels", "impressions"):
        r = report[t]
        r["reconciles"] = r["rows_read"] == r["rows_kept"] + sum(r["rows_dropped"].values())
        assert r["reconciles"], f"data report does not reconcile for {t}: {r}"
    (tmp / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    # Replace the previous output only once everything is written: no half-written outputs.
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return report
