"""The classic unsupervised use of unlabeled behaviors: latent factors of the user × item matrix.

Fitted on the same unlabeled users pre-training learns from (the pre-training corpus: the
`before_test` view of its training users, no label, no impression), so the `svd_*` baselines
and the pre-trained models see the same unlabeled data. TF-IDF (sublinear tf) of each user's
bag of items, then a truncated SVD (latent semantic analysis): a user's factors are the
projection of their TF-IDF row, an item's factors its column of the right singular vectors, and
user · item is the TF-IDF weight the rank-r approximation gives the item in that user's bag.

The SVD is fitted once at the largest rank of `RANKS`; rank r uses the first r components
(sorted by singular value), so every rank comes from one fit. scikit-learn's `TruncatedSVD`
(randomized, seeded): a well-kept implementation that works on the sparse matrix directly and
is deterministic for a seed; ALS (`implicit`) would add a dependency for an implicit-feedback
weighting the TF-IDF already gives, and is not deterministic across thread counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfTransformer

from ptum.data.corpus import Corpus

RANKS = (16, 32, 64, 128)  # chosen among on validation, per cell
SEED = 0  # the factorization is label-free and shared by every cell: one fixed seed


def bag_of_items(corpus: Corpus) -> sparse.csr_matrix:
    """(U, N + 1) counts of each item in each user's (truncated, padded) sequence."""
    u, pos = np.nonzero(corpus.items > 0)
    return sparse.csr_matrix(
        (np.ones(len(u)), (u, corpus.items[u, pos])),
        shape=(corpus.items.shape[0], corpus.tokens.shape[0]),
    )


@dataclass(frozen=True)
class Factors:
    """TF-IDF weighting and truncated SVD of the unlabeled user × item matrix."""

    tfidf: TfidfTransformer
    svd: TruncatedSVD
    ranks: tuple[int, ...]  # the ranks a baseline chooses among (at most the fitted one)

    def users(self, bags: sparse.csr_matrix, rank: int) -> np.ndarray:
        """(U, rank) factors of the users whose bags of items are the rows of `bags`
        ((U, N + 1) counts; users outside the fitted corpus too)."""
        return self.svd.transform(self.tfidf.transform(bags))[:, :rank]

    def items(self, rank: int) -> np.ndarray:
        """(N + 1, rank) factors of every item id (row 0, the padding item: zeros)."""
        return self.svd.components_[:rank].T


def fit_factors(corpus: Corpus, ranks: tuple[int, ...] = RANKS) -> Factors:
    """Factors of `corpus` (unlabeled users) at up to max(ranks); ranks above what the matrix
    allows (fewer users or items than the rank) are dropped."""
    bags = bag_of_items(corpus)
    tfidf = TfidfTransformer(sublinear_tf=True).fit(bags)
    x = tfidf.transform(bags)
    usable = tuple(r for r in ranks if r < min(x.shape)) or (max(1, min(x.shape) - 1),)
    svd = TruncatedSVD(n_components=max(usable), random_state=SEED).fit(x)
    return Factors(tfidf=tfidf, svd=svd, ranks=usable)
