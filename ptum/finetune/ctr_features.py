"""Label-free and out-of-fold features of a CTR impression, for the feature-based baselines.

Every feature is computed from data strictly before the impression's window: the history
sequences end where the window starts, popularity counts the behaviors before the window, and a
click rate of a test impression uses only the training subset's labels (the CTR-train window
precedes the test window). Click-rate features of a *training* impression are out-of-fold
(`OOF_FOLDS` folds), so a row never sees its own label.
"""

from __future__ import annotations

from typing import cast

import numpy as np

from ptum.finetune.data import CtrTask
from ptum.finetune.factors import Factors, bag_of_items

OOF_FOLDS = 5


def token_overlap(task: CtrTask) -> np.ndarray:
    """Share of the candidate's tokens that occur in the user's history titles, per impression
    (label-free; the history ends where the impression's window starts)."""
    d = task.data
    tokens = d.hist_train.tokens.numpy()
    out = np.zeros(len(d.item))
    for hist, is_test in ((d.hist_train, False), (d.hist_test, True)):
        idx = np.flatnonzero((d.window == "test") == is_test)
        seen = [
            np.unique(tokens[hist.items[u, : hist.lengths[u]]]) for u in range(len(hist.user_ids))
        ]
        for i in idx:
            cand = tokens[d.item[i]]
            cand = cand[cand != 0]
            out[i] = np.isin(cand, seen[d.row[i]]).mean() if len(cand) else 0.0
    return out


def _rate(keys: np.ndarray, clicked: np.ndarray, fit: np.ndarray, at: np.ndarray, a: float):
    """Smoothed click rate of keys[at] from the impressions `fit` (prior = their mean)."""
    n = int(keys.max()) + 1
    clicks = np.bincount(keys[fit], weights=clicked[fit], minlength=n)
    shown = np.bincount(keys[fit], minlength=n)
    prior = clicked[fit].mean() if len(fit) else 0.0
    return (clicks[keys[at]] + a * prior) / (shown[keys[at]] + a)


def _rate_feature(
    keys: np.ndarray, clicked: np.ndarray, train: np.ndarray, a: float, seed: int
) -> np.ndarray:
    """Click-rate feature of every impression: out-of-fold for the training rows, from all
    training rows for every other row (valid, test)."""
    out = _rate(keys, clicked, train, np.arange(len(keys)), a)
    fold = np.random.default_rng(seed).integers(0, OOF_FOLDS, len(train))
    for f in range(OOF_FOLDS):
        out[train[fold == f]] = _rate(keys, clicked, train[fold != f], train[fold == f], a)
    return out


def ctr_features(task: CtrTask, train: np.ndarray, a: float, seed: int) -> np.ndarray:
    """(n_impressions, 4) features of feature_lr: log popularity share, item click rate, user
    click rate, token overlap."""
    d = task.data
    is_test = d.window == "test"
    # A CTR task always has popularity (load_ctr builds it): the casts only inform the type checker.
    pop = np.where(
        is_test,
        cast(np.ndarray, d.popularity_test)[d.item],
        cast(np.ndarray, d.popularity_train)[d.item],
    )
    total = np.where(
        is_test,
        cast(np.ndarray, d.popularity_test).sum(),
        cast(np.ndarray, d.popularity_train).sum(),
    )
    _, user_keys = np.unique(task.users, return_inverse=True)
    return np.column_stack(
        [
            np.log((pop + 1.0) / (total + len(cast(np.ndarray, d.popularity_test)))),
            _rate_feature(d.item, d.clicked, train, a, seed),
            _rate_feature(user_keys, d.clicked, train, a, seed),
            task_overlap(task),
        ]
    )


_OVERLAP: dict[int, np.ndarray] = {}


def task_overlap(task: CtrTask) -> np.ndarray:
    """token_overlap, computed once per loaded task (it does not depend on the split)."""
    key = id(task.data.item)
    if key not in _OVERLAP:
        _OVERLAP[key] = token_overlap(task)
    return _OVERLAP[key]


def factor_score(task: CtrTask, factors: Factors, rank: int) -> np.ndarray:
    """user . item of the unlabeled latent factors, per impression: the user's history before
    the impression's window projected on the factors, dotted with the candidate's factors."""
    d = task.data
    items = factors.items(rank)
    out = np.zeros(len(d.item))
    for hist, is_test in ((d.hist_train, False), (d.hist_test, True)):
        idx = np.flatnonzero((d.window == "test") == is_test)
        users = factors.users(bag_of_items(hist), rank)
        out[idx] = np.einsum("ij,ij->i", users[d.row[idx]], items[d.item[idx]])
    return out
