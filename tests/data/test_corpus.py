"""The pre-training corpus: padding of the sequence columns, and a corpus read from the tiny
data set."""

from __future__ import annotations

import numpy as np
import polars as pl

from ptum.data.corpus import load_corpus, pad_column


def test_pad_column_keeps_the_last_behaviors_right_padded():
    lists = pl.Series("x", [[1, 2, 3], [], None, [4, 5, 6, 7, 8]], dtype=pl.List(pl.Int32))
    out, lengths = pad_column(lists, 4)
    assert out.dtype == np.int64 and out.shape == (4, 4)
    assert out.tolist() == [[1, 2, 3, 0], [0, 0, 0, 0], [0, 0, 0, 0], [5, 6, 7, 8]]
    assert lengths.tolist() == [3, 0, 0, 4]


def test_a_corpus_of_given_users_keeps_their_order_and_every_behavior(tiny_pipeline):
    prepared, tokenized = tiny_pipeline / "prepared", tiny_pipeline / "tokenized"
    seqs = pl.read_parquet(prepared / "sequences.parquet").filter(pl.col("view") == "full")
    users = seqs["user_id"].to_list()[:5][::-1] + ["nobody"]
    corpus = load_corpus(prepared, tokenized, "", 20, view="full", users=users)
    assert corpus.user_ids == users
    for i, u in enumerate(users[:-1]):
        items = seqs.filter(pl.col("user_id") == u)["item_ids"][0].to_list()[-20:]
        assert corpus.items[i, : corpus.lengths[i]].tolist() == items
        assert (corpus.items[i, corpus.lengths[i] :] == 0).all()
    assert corpus.lengths[-1] == 0 and (corpus.items[-1] == 0).all()
    assert sorted(corpus.pool.tolist()) == sorted(corpus.items[corpus.items > 0].tolist())
