"""MBP/NBP sample construction: negatives, masking, no peeking at the future; the corpus is
read only from checked stage outputs."""

from __future__ import annotations

import shutil

import numpy as np
import polars as pl
import pytest

from ptum.data.corpus import item_texts, load_corpus
from ptum.data.verified import DamagedInput
from ptum.hashing import HashMismatch
from ptum.pretrain.data import make_batch, sample_negatives, step_rng


@pytest.fixture(scope="module")
def corpus(tiny_pipeline):
    return load_corpus(tiny_pipeline / "prepared", tiny_pipeline / "tokenized", "train", 20)


@pytest.mark.parametrize("mode", ["popularity", "uniform"])
def test_negatives_never_in_own_history(corpus, mode):
    rows = np.flatnonzero(corpus.lengths >= 2)[:64]
    b = make_batch(corpus, rows, step_rng(1, 0, 0), k=2, p=4, negatives=mode)
    hist = corpus.items[rows]
    mbp_neg = b.mbp_cands[:, 1:].numpy()
    nbp_neg = b.nbp_cands[:, :, 1:].numpy()
    for i in range(len(rows)):
        own = set(hist[i][hist[i] > 0].tolist())
        ok = b.mbp_valid[i, 1:].numpy()
        assert not (set(mbp_neg[i][ok].tolist()) & own)
        assert b.mbp_cands[i, 0].item() in own  # the positive is the masked behavior
        assert b.mbp_cands[i, 0].item() not in mbp_neg[i][ok].tolist()
        okn = b.nbp_valid[i, :, 1:].numpy()
        assert not (set(nbp_neg[i][okn].tolist()) & own)
    assert b.mbp_valid.float().mean() > 0.95


def test_popularity_sampling_follows_behavior_counts(corpus):
    rng = np.random.default_rng(0)
    hist = np.zeros((4000, 1), dtype=np.int64)
    neg, _ = sample_negatives(rng, (4000, 5), hist, corpus.pool, corpus.num_items, "popularity")
    counts = np.bincount(neg.ravel(), minlength=corpus.num_items + 1)
    expected = np.bincount(corpus.pool, minlength=corpus.num_items + 1)
    top = expected.argmax()
    assert counts[top] / counts.sum() == pytest.approx(expected[top] / expected.sum(), rel=0.15)
    uni, _ = sample_negatives(rng, (4000, 5), hist, corpus.pool, corpus.num_items, "uniform")
    assert np.bincount(uni.ravel())[top] < counts[top] / 2


def test_exactly_one_masked_and_nbp_sees_only_the_past(corpus):
    rows = np.flatnonzero(corpus.lengths >= 2)[:64]
    b = make_batch(corpus, rows, step_rng(1, 0, 3), k=3, p=2, negatives="popularity")
    assert (b.mbp_mask.sum(1) == 1).all()
    assert (b.mbp_mask & ~b.mask).sum() == 0  # only real behaviors are masked
    for i, r in enumerate(rows):
        t = int(b.past_mask[i].sum())
        seq = corpus.items[r]
        n = corpus.lengths[r]
        assert 1 <= t < n
        assert b.past_items[i, :t].tolist() == seq[:t].tolist()
        assert (b.past_items[i, t:] == 0).all()  # nothing at or after the cut
        for k in range(3):
            if t + k < n:
                assert b.nbp_target_valid[i, k] and b.nbp_cands[i, k, 0] == seq[t + k]
            else:
                assert not b.nbp_target_valid[i, k]
        # Recency positions count back from the last visible behavior.
        assert b.past_positions[i, :t].tolist() == list(range(t - 1, -1, -1))


def test_batches_are_a_function_of_the_seed(corpus):
    rows = np.flatnonzero(corpus.lengths >= 2)[:16]
    a = make_batch(corpus, rows, step_rng(1, 2, 3), k=2, p=4, negatives="popularity")
    b = make_batch(corpus, rows, step_rng(1, 2, 3), k=2, p=4, negatives="popularity")
    c = make_batch(corpus, rows, step_rng(1, 2, 4), k=2, p=4, negatives="popularity")
    assert all((getattr(a, f) == getattr(b, f)).all() for f in a.__dict__)
    assert not (a.mbp_cands == c.mbp_cands).all()


def test_the_corpus_is_read_only_from_checked_outputs(tiny_pipeline, tmp_path):
    prepared = tmp_path / "prepared"
    shutil.copytree(tiny_pipeline / "prepared", prepared)
    users = pl.read_parquet(prepared / "users.parquet")
    flipped = users.with_columns(
        pl.when(pl.col("pretrain_split") == "train")
        .then(pl.lit("valid"))
        .otherwise(pl.lit("train"))
        .alias("pretrain_split")
    )
    flipped.write_parquet(prepared / "users.parquet")  # a silent change of the split
    with pytest.raises(HashMismatch, match=r"users.parquet: SHA-256 .*`ptum prepare`"):
        load_corpus(prepared, tiny_pipeline / "tokenized", "train", 20)
    (prepared / "manifest.json").unlink()  # as an older ptum left it
    with pytest.raises(DamagedInput, match=r"manifest.json: missing.* rerun `ptum prepare`$"):
        item_texts(prepared)
