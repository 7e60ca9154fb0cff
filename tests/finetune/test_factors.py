"""Latent factors of the unlabeled user x item matrix (the svd_* baselines' representation)."""

from __future__ import annotations

import numpy as np
import pytest

from ptum.data.corpus import load_corpus
from ptum.finetune.factors import RANKS, bag_of_items, fit_factors


@pytest.fixture(scope="module")
def corpus(tiny_pipeline):
    return load_corpus(tiny_pipeline / "prepared", tiny_pipeline / "tokenized", "train", 20)


def test_every_rank_is_a_prefix_of_one_fit(corpus):
    f = fit_factors(corpus)
    limit = min(corpus.items.shape[0], corpus.num_items + 1)  # users, items (+ padding)
    assert f.ranks == tuple(r for r in RANKS if r < limit) and len(f.ranks) >= 2
    bags = bag_of_items(corpus)
    big, small = f.users(bags, max(f.ranks)), f.users(bags, f.ranks[0])
    assert big.shape == (corpus.items.shape[0], max(f.ranks))
    np.testing.assert_allclose(small, big[:, : f.ranks[0]])
    assert f.items(8).shape == (corpus.num_items + 1, 8)
    np.testing.assert_allclose(f.items(8)[0], 0.0, atol=1e-12)  # the padding item never occurs


def test_the_fit_is_deterministic_and_label_free(corpus):
    a, b = fit_factors(corpus), fit_factors(corpus)
    bags = bag_of_items(corpus)
    np.testing.assert_array_equal(a.users(bags, 16), b.users(bags, 16))


def test_a_users_own_items_score_above_items_they_never_had(corpus):
    """user . item is the rank-r TF-IDF weight of the item in the user's bag: the items a user
    has score higher, on average, than the items the user never had."""
    f = fit_factors(corpus)
    bags = bag_of_items(corpus)
    scores = f.users(bags, 32) @ f.items(32).T  # (U, N + 1)
    has = bags.toarray() > 0
    has[:, 0] = False
    never = ~has
    never[:, 0] = False
    assert scores[has].mean() > scores[never].mean() + 0.05


def test_ranks_the_matrix_cannot_hold_are_dropped(corpus):
    small = fit_factors(corpus, ranks=(4, 10_000))
    assert small.ranks == (4,)
