"""The downstream tasks' data, and the split each repeat of the grid re-draws.

`load_demo` / `load_ctr` read the prepared tables once. A repeat r of the grid then calls
`DemoTask.resplit(seed)` / `CtrTask.resplit(seed)`: the labeled users are re-drawn into
train/valid/test (and the nested 20/50/100% training subsets), and the CTR-train window's
impressions are re-drawn into train/valid (and the nested subsets). The CTR-test window is fixed
by time: it is the future, whatever the repeat. Every method of a repeat (baselines, scratch,
frozen, fine-tuned) sees the same split, so comparisons are paired by repeat. The draws use the
same functions as `prepare` (`split_labels`, `split_impressions`), so repeat r with seed s gives
what `prepare` would write with `prepare.seed = s`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import polars as pl

from ptum.data import verified
from ptum.data.corpus import Corpus, load_corpus
from ptum.data.prepare.splits import ratio_column, split_impressions, split_labels
from ptum.finetune.ctr import CtrData


@dataclass(frozen=True)
class DemoTask:
    """Labeled users (rows sorted by user id) with their `full` sequences."""

    corpus: Corpus
    labels: dict[str, tuple[np.ndarray, list[str]]]  # label -> (class index per row, classes)
    split: np.ndarray  # "train" | "valid" | "test" per row
    subsets: dict[float, np.ndarray]  # ratio -> bool per row (nested training subsets)

    def resplit(self, seed: int, fractions: tuple[float, float, float]) -> DemoTask:
        """The same users re-drawn into train/valid/test and nested subsets with `seed`."""
        ratios = tuple(self.subsets)
        df = split_labels(pl.DataFrame({"user_id": self.corpus.user_ids}), fractions, ratios, seed)
        subsets = {r: df[ratio_column(r)].to_numpy() for r in ratios}
        return replace(self, split=df["split"].to_numpy(), subsets=subsets)


def load_demo(
    prepared: Path,
    tokenized: Path,
    max_len: int,
    ratios: list[float],
    users: set[str] | None = None,
) -> DemoTask:
    """The Demo task: every labeled user, or only `users` among them."""
    labels = verified.read_parquet(prepared / "labels.parquet", "prepare").sort("user_id")
    if users is not None:
        labels = labels.filter(pl.col("user_id").is_in(sorted(users)))
    report = verified.read_json(prepared / "report.json", "prepare")
    cols = report["labels"].get("label_columns", [])
    corpus = load_corpus(
        prepared, tokenized, "", max_len, view="full", users=labels["user_id"].to_list()
    )
    out = {}
    for c in cols:
        classes = sorted(labels[c].drop_nulls().unique().to_list())
        index = {v: i for i, v in enumerate(classes)}
        out[c] = (np.array([index.get(v, -1) if v is not None else -1 for v in labels[c]]), classes)
    subsets = {r: labels[ratio_column(r)].to_numpy() for r in ratios}
    return DemoTask(corpus, out, labels["split"].to_numpy(), subsets)


@dataclass(frozen=True)
class CtrTask:
    """CTR impressions, their histories, and label-free item popularity before each window."""

    data: CtrData
    subsets: dict[float, np.ndarray]  # ratio -> bool per impression (nested, train window)
    users: np.ndarray  # user id per impression (str)

    def resplit(self, seed: int, valid_frac: float) -> CtrTask:
        """CTR-train window impressions re-drawn into train/valid and nested subsets."""
        ratios = tuple(self.subsets)
        window = np.where(self.data.window == "valid", "train", self.data.window)
        df = split_impressions(
            pl.DataFrame({"window": pl.Series(window, dtype=pl.String)}), valid_frac, ratios, seed
        )
        subsets = {r: df[ratio_column(r)].to_numpy() for r in ratios}
        return replace(
            self, data=replace(self.data, window=df["window"].to_numpy()), subsets=subsets
        )


def _item_counts(prepared: Path, view: str, n_items: int) -> np.ndarray:
    ids = (
        verified.read_parquet(prepared / "sequences.parquet", "prepare", ["view", "item_ids"])
        .filter(pl.col("view") == view)["item_ids"]
        .explode()
        .drop_nulls()
        .to_numpy()
    )
    return np.bincount(ids.astype(np.int64), minlength=n_items).astype(np.float64)


def load_ctr(
    prepared: Path,
    tokenized: Path,
    max_len: int,
    ratios: list[float],
    users: set[str] | None = None,
) -> CtrTask:
    """The CTR task: every impression, or only those of `users`."""
    imps = verified.read_parquet(prepared / "impressions.parquet", "prepare")
    if users is not None:
        imps = imps.filter(pl.col("user_id").is_in(sorted(users)))
    is_test = imps["window"] == "test"
    train_users = imps.filter(~is_test)["user_id"].unique().sort().to_list()
    test_users = imps.filter(is_test)["user_id"].unique().sort().to_list()
    hist_train = load_corpus(
        prepared, tokenized, "", max_len, view="before_train", users=train_users
    )
    hist_test = load_corpus(prepared, tokenized, "", max_len, view="before_test", users=test_users)
    tr = {u: i for i, u in enumerate(train_users)}
    te = {u: i for i, u in enumerate(test_users)}
    row = np.array(
        [te[u] if t else tr[u] for u, t in zip(imps["user_id"], is_test)], dtype=np.int64
    )
    n_items = hist_train.tokens.shape[0]
    data = CtrData(
        hist_train,
        hist_test,
        row,
        imps["item_id"].to_numpy().astype(np.int64),
        imps["clicked"].to_numpy().astype(np.int64),
        imps["window"].to_numpy(),
        # Label-free popularity of each item in the behaviors before each window (all users).
        popularity_train=_item_counts(prepared, "before_train", n_items),
        popularity_test=_item_counts(prepared, "before_test", n_items),
        user=np.unique(imps["user_id"].to_numpy(), return_inverse=True)[1].astype(np.int64),
    )
    return CtrTask(
        data, {r: imps[ratio_column(r)].to_numpy() for r in ratios}, imps["user_id"].to_numpy()
    )
