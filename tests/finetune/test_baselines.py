"""Baselines and resampled splits: a new split per repeat, and no baseline sees a test label or
data from after an impression's window."""

from dataclasses import replace

import numpy as np
import polars as pl
import pytest

from ptum.data.corpus import load_corpus
from ptum.data.prepare import split_labels
from ptum.finetune.baselines import (
    CTR_BASELINES,
    DEMO_BASELINES,
    ctr_features,
    run_ctr_baseline,
    run_demo_baseline,
    tfidf_lr_logits,
)
from ptum.finetune.data import load_ctr, load_demo
from ptum.finetune.factors import fit_factors

RATIOS = [0.2, 0.5, 1.0]


@pytest.fixture(scope="module")
def demo(tiny_pipeline):
    return load_demo(tiny_pipeline / "prepared", tiny_pipeline / "tokenized", 20, RATIOS)


@pytest.fixture(scope="module")
def ctr(tiny_pipeline):
    return load_ctr(tiny_pipeline / "prepared", tiny_pipeline / "tokenized", 20, RATIOS)


@pytest.fixture(scope="module")
def factors(tiny_pipeline):
    """The unlabeled corpus's factors, as a grid worker fits them (pre-training's users)."""
    unlabeled = load_corpus(tiny_pipeline / "prepared", tiny_pipeline / "tokenized", "train", 20)
    return fit_factors(unlabeled)


def test_demo_resplit_is_prepares_split_with_the_repeat_seed(demo):
    a, b = demo.resplit(101, (0.8, 0.1, 0.1)), demo.resplit(102, (0.8, 0.1, 0.1))
    assert (a.split != b.split).any()
    assert (a.split == demo.resplit(101, (0.8, 0.1, 0.1)).split).all()
    ref = split_labels(
        pl.DataFrame({"user_id": demo.corpus.user_ids}), (0.8, 0.1, 0.1), tuple(RATIOS), 101
    )
    assert (a.split == ref["split"].to_numpy()).all()
    for r, lo in zip(RATIOS, RATIOS[1:]):  # nested subsets of the train split
        assert (a.subsets[r] <= a.subsets[lo]).all()
    assert (a.subsets[1.0] == (a.split == "train")).all()


def test_ctr_resplit_keeps_the_test_window_and_redraws_train_valid(ctr):
    a, b = ctr.resplit(101, 0.1), ctr.resplit(102, 0.1)
    assert ((a.data.window == "test") == (ctr.data.window == "test")).all()
    assert ((a.data.window == "test") == (b.data.window == "test")).all()
    assert (a.data.window != b.data.window).any()
    assert not (a.subsets[1.0] & (a.data.window != "train")).any()


def _flip_test_labels(task):
    d = task.data
    clicked = np.where(d.window == "test", 1 - d.clicked, d.clicked)
    return replace(task, data=replace(d, clicked=clicked))


def test_ctr_features_never_use_test_labels(ctr):
    task = ctr.resplit(100, 0.1)
    train = np.flatnonzero(task.subsets[0.5])
    x = ctr_features(task, train, 10.0, seed=0)
    flipped = ctr_features(_flip_test_labels(task), train, 10.0, seed=0)
    np.testing.assert_array_equal(x, flipped)


def test_training_rows_never_see_their_own_label(ctr):
    """Out-of-fold click rates: flipping one training label leaves its own features unchanged."""
    task = ctr.resplit(100, 0.1)
    train = np.flatnonzero(task.subsets[1.0])
    i = train[3]
    d = task.data
    clicked = d.clicked.copy()
    clicked[i] = 1 - clicked[i]
    other = replace(task, data=replace(d, clicked=clicked))
    a, b = ctr_features(task, train, 10.0, seed=0), ctr_features(other, train, 10.0, seed=0)
    np.testing.assert_array_equal(a[i], b[i])
    assert not np.array_equal(a, b)  # the others do see it


@pytest.mark.parametrize("name", CTR_BASELINES)
def test_ctr_baseline_scores_ignore_test_labels(ctr, factors, name):
    task = ctr.resplit(100, 0.1)
    a = run_ctr_baseline(name, task, 0.5, seed=100, factors=factors)
    b = run_ctr_baseline(name, _flip_test_labels(task), 0.5, seed=100, factors=factors)
    assert a["pred"]["score"] == b["pred"]["score"]
    assert a["chosen"] == b["chosen"]
    assert a["test"]["auc"] == pytest.approx(1 - b["test"]["auc"])


def test_popularity_counts_only_behaviors_before_the_window(tiny_pipeline, ctr):
    seqs = pl.read_parquet(tiny_pipeline / "prepared" / "sequences.parquet")
    imps = pl.read_parquet(tiny_pipeline / "prepared" / "impressions.parquet")
    t_test = imps.filter(pl.col("window") == "test")["timestamp"].min()
    t_train = imps.filter(pl.col("window") != "test")["timestamp"].min()
    for view, t in (("before_test", t_test), ("before_train", t_train)):
        ts = seqs.filter(pl.col("view") == view)["timestamps"].explode().drop_nulls()
        assert ts.max() < t
    assert ctr.data.popularity_test.sum() >= ctr.data.popularity_train.sum() > 0


@pytest.mark.parametrize("name", DEMO_BASELINES)
def test_demo_baselines_choose_on_validation_only(demo, factors, name):
    task = demo.resplit(100, (0.8, 0.1, 0.1))
    y, classes = task.labels["gender"]
    y2 = np.where(task.split == "test", (y + 1) % len(classes), y)
    other = replace(task, labels={**task.labels, "gender": (y2, classes)})
    a = run_demo_baseline(name, task, "gender", 1.0, select="macro_f1", seed=0, factors=factors)
    b = run_demo_baseline(name, other, "gender", 1.0, select="macro_f1", seed=0, factors=factors)
    assert a["chosen"] == b["chosen"] and a["pred"]["pred"] == b["pred"]["pred"]
    assert a["pred"]["y"] != b["pred"]["y"]


def test_wide_logits_never_use_test_labels_or_a_training_rows_own_label(demo):
    task = demo.resplit(100, (0.8, 0.1, 0.1))
    y, classes = task.labels["gender"]
    a = tfidf_lr_logits(task, "gender", 1.0, select="macro_f1", seed=0)
    assert a.shape == (len(y), len(classes)) and np.isfinite(a).all()
    # Test labels flipped: no wide value moves.
    y_test = np.where(task.split == "test", (y + 1) % len(classes), y)
    flipped = replace(task, labels={**task.labels, "gender": (y_test, classes)})
    assert np.array_equal(a, tfidf_lr_logits(flipped, "gender", 1.0, select="macro_f1", seed=0))
    # One training row's label flipped: its own (out-of-fold) value does not move, as long as
    # the flip does not change the hyper-parameters chosen on validation.
    train = np.flatnonzero(task.subsets[1.0] & (y >= 0))
    i = train[0]
    y_one = y.copy()
    y_one[i] = (y[i] + 1) % len(classes)
    one = replace(task, labels={**task.labels, "gender": (y_one, classes)})
    same_choice = (
        run_demo_baseline("tfidf_lr", task, "gender", 1.0, select="macro_f1", seed=0)["chosen"]
        == run_demo_baseline("tfidf_lr", one, "gender", 1.0, select="macro_f1", seed=0)["chosen"]
    )
    assert same_choice
    b = tfidf_lr_logits(one, "gender", 1.0, select="macro_f1", seed=0)
    assert np.array_equal(a[i], b[i])
    assert not np.array_equal(a, b)  # the other rows' models did see the flipped label


def test_the_svd_baselines_choose_a_rank_on_validation_and_need_the_factors(demo, ctr, factors):
    task = demo.resplit(100, (0.8, 0.1, 0.1))
    res = run_demo_baseline("svd_lr", task, "gender", 1.0, select="acc", seed=0, factors=factors)
    assert res["chosen"]["rank"] in factors.ranks and set(res["chosen"]) == {
        "rank",
        "C",
        "class_weight",
    }
    # The chosen rank is the one with the best validation score (each rank on its own).
    per_rank = {
        r: run_demo_baseline(
            "svd_lr",
            task,
            "gender",
            1.0,
            select="acc",
            seed=0,
            factors=replace(factors, ranks=(r,)),
        )["valid"]["acc"]
        for r in factors.ranks
    }
    assert res["valid"]["acc"] == max(per_rank.values())
    assert per_rank[res["chosen"]["rank"]] == max(per_rank.values())
    out = run_ctr_baseline("svd_feature_lr", ctr.resplit(100, 0.1), 0.5, seed=1, factors=factors)
    assert out["chosen"]["rank"] in factors.ranks and {"a", "C"} <= set(out["chosen"])
    with pytest.raises(ValueError, match="needs the unlabeled corpus's factors"):
        run_demo_baseline("svd_lr", task, "gender", 1.0, select="acc", seed=0)
    with pytest.raises(ValueError, match="needs the unlabeled corpus's factors"):
        run_ctr_baseline("svd_feature_lr", ctr.resplit(100, 0.1), 0.5, seed=1)
