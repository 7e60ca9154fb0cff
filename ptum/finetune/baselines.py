"""The simple baselines a practitioner tries first, as methods of the fine-tuning grid.

Each baseline runs on exactly the split, training subset and repeat of the neural cells it is
compared with, chooses its own hyper-parameters on the validation split (by the same selection
metric as the neural models), and scores the test split once. Results have the neural cells'
shape: `{"valid": {...}, "test": {...}, "pred": {...}, "chosen": {...}}`.

Demo (label of a user):
    majority   the training subset's most frequent class.
    tfidf_lr   TF-IDF over the bag of items of the user's behavior window (the same window the
               user models see), logistic regression; C and class weighting chosen on valid.
    svd_lr     the classic unsupervised use of the unlabeled behaviors: the user's latent
               factors (truncated SVD of the TF-IDF user x item matrix of the pre-training
               corpus, no labels: `ptum.finetune.factors`), then the same logistic regression;
               rank, C and class weighting chosen on valid.

CTR (click on an impression). Every feature of an impression is computed from data strictly
before its window: the history sequences end where the window starts, popularity counts the
behaviors before the window, and the click-rate features of a test impression use only the
training subset's labels (the CTR-train window precedes the test window). Click-rate features of
a *training* impression are computed out-of-fold (5 folds), so a row never sees its own label.
    popularity   the candidate's number of behaviors before the window (label-free).
    item_ctr     the candidate's smoothed click rate in the training subset.
    user_ctr     the user's smoothed click rate in the training subset.
    feature_lr   logistic regression on log popularity, item and user click rates and the
                 share of the candidate's tokens found in the user's history titles.
    id_lr        logistic regression on one-hot user id + item id (a factorization-free
                 "who clicks what" model).
    svd_feature_lr  feature_lr's features plus the user . item score of the unlabeled latent
                 factors (the user's history projected, the candidate's item factors); rank,
                 smoothing and C chosen on valid.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import cast

import numpy as np
from scipy import sparse
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_extraction.text import TfidfTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from ptum.finetune.ctr_features import OOF_FOLDS, _rate, ctr_features, factor_score
from ptum.finetune.data import CtrTask, DemoTask
from ptum.finetune.factors import Factors, bag_of_items
from ptum.finetune.metrics import accuracy, average_precision, macro_f1, roc_auc

DEMO_BASELINES = ("majority", "tfidf_lr", "svd_lr")
CTR_BASELINES = ("popularity", "item_ctr", "user_ctr", "feature_lr", "id_lr", "svd_feature_lr")
FACTOR_BASELINES = ("svd_lr", "svd_feature_lr")  # fitted on the unlabeled users' factors
C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
SMOOTHING_GRID = (1.0, 10.0, 100.0)


def _logreg(c: float, class_weight: str | None, seed: int) -> LogisticRegression:
    return LogisticRegression(C=c, class_weight=class_weight, max_iter=2000, random_state=seed)


def _fit(model: LogisticRegression, x, y: np.ndarray) -> LogisticRegression:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(x, y)


# ---------------------------------------------------------------- demographic


def _demo_scores(y: np.ndarray, pred: np.ndarray, n_classes: int) -> dict[str, float]:
    return {"acc": accuracy(y, pred), "macro_f1": macro_f1(y, pred, n_classes)}


def _tfidf_lr(
    task: DemoTask,
    y: np.ndarray,
    train: np.ndarray,
    valid: np.ndarray,
    k: int,
    select: str,
    seed: int,
) -> tuple[sparse.csr_matrix, LogisticRegression, dict]:
    """TF-IDF features of every row (IDF from the training rows) and the logistic regression
    whose C and class weighting score best on the validation rows by `select`."""
    tfidf = TfidfTransformer(sublinear_tf=True).fit(bag_of_items(task.corpus)[train])
    x = tfidf.transform(bag_of_items(task.corpus))
    best: tuple[float, LogisticRegression, dict] | None = None
    for c in C_GRID:
        for weight in (None, "balanced"):
            model = _fit(_logreg(c, weight, seed), x[train], y[train])
            s = _demo_scores(y[valid], model.predict(x[valid]), k)[select]
            if best is None or s > best[0]:
                best = (s, model, {"C": c, "class_weight": weight or "none"})
    _, model, chosen = cast(tuple[float, LogisticRegression, dict], best)  # C_GRID is not empty
    return x, model, chosen


def _svd_lr(
    task: DemoTask,
    factors: Factors,
    y: np.ndarray,
    rows: tuple[np.ndarray, np.ndarray],
    k: int,
    select: str,
    seed: int,
) -> tuple[np.ndarray, LogisticRegression, dict]:
    """Standardized latent factors of every row and the logistic regression whose rank, C and
    class weighting score best on the validation rows by `select` (rows: train, valid)."""
    train, valid = rows
    bags = bag_of_items(task.corpus)
    best: tuple[float, np.ndarray, LogisticRegression, dict] | None = None
    for rank in factors.ranks:
        u = factors.users(bags, rank)
        x = StandardScaler().fit(u[train]).transform(u)
        for c in C_GRID:
            for weight in (None, "balanced"):
                model = _fit(_logreg(c, weight, seed), x[train], y[train])
                s = _demo_scores(y[valid], model.predict(x[valid]), k)[select]
                if best is None or s > best[0]:
                    best = (s, x, model, {"rank": rank, "C": c, "class_weight": weight or "none"})
    _, x, model, chosen = cast(tuple[float, np.ndarray, LogisticRegression, dict], best)
    return x, model, chosen


def _log_proba(model: LogisticRegression, x, k: int) -> np.ndarray:
    """(rows, k) log-probabilities; a class the model never saw gets log(1e-6)."""
    out = np.full((x.shape[0], k), np.log(1e-6))
    out[:, model.classes_] = np.log(np.clip(model.predict_proba(x), 1e-6, None))
    return out


def tfidf_lr_logits(
    task: DemoTask, label: str, ratio: float, *, select: str, seed: int
) -> np.ndarray:
    """The "wide" input of the neural Demo heads (finetune.demo_wide): (rows, classes)
    log-probabilities of the `tfidf_lr` baseline chosen on validation exactly as that baseline
    is. A training row gets its out-of-fold value (5 folds, the chosen C and weighting), so
    the head never sees a prediction fitted on its own label; every other row (valid, test,
    unlabeled) gets the model fitted on the whole training subset."""
    y, classes = task.labels[label]
    k = len(classes)
    train = np.flatnonzero(task.subsets[ratio] & (y >= 0))
    valid = np.flatnonzero((task.split == "valid") & (y >= 0))
    x, model, chosen = _tfidf_lr(task, y, train, valid, k, select, seed)
    out = _log_proba(model, x, k)
    weight = None if chosen["class_weight"] == "none" else chosen["class_weight"]
    folds = np.random.default_rng(seed).permutation(len(train)) % OOF_FOLDS
    for f in range(OOF_FOLDS):
        fit, held = train[folds != f], train[folds == f]
        if len(held) == 0 or len(np.unique(y[fit])) < 2:
            continue  # too few labels for a fold model: keep the full-fit value
        fold_model = _fit(_logreg(chosen["C"], weight, seed), x[fit], y[fit])
        out[held] = _log_proba(fold_model, x[held], k)
    return out.astype(np.float32)


def run_demo_baseline(
    name: str,
    task: DemoTask,
    label: str,
    ratio: float,
    *,
    select: str,
    seed: int,
    factors: Factors | None = None,
) -> dict:
    """One Demo baseline cell on `task`'s current split (see DemoTask.resplit); `factors`:
    the unlabeled corpus's latent factors (svd_lr)."""
    y, classes = task.labels[label]
    k = len(classes)
    train = np.flatnonzero(task.subsets[ratio] & (y >= 0))
    valid = np.flatnonzero((task.split == "valid") & (y >= 0))
    test = np.flatnonzero((task.split == "test") & (y >= 0))
    chosen, predict = _demo_predictor(name, task, label, (train, valid), select, seed, factors)
    pred = predict(test)
    return {
        "valid": _demo_scores(y[valid], predict(valid), k),
        "test": _demo_scores(y[test], pred, k),
        "pred": {"row": test.tolist(), "y": y[test].tolist(), "pred": np.asarray(pred).tolist()},
        "chosen": chosen,
        "n_train": len(train),
        "n_valid": len(valid),
        "n_test": len(test),
    }


def _demo_predictor(
    name: str,
    task: DemoTask,
    label: str,
    rows: tuple[np.ndarray, np.ndarray],
    select: str,
    seed: int,
    factors: Factors | None,
) -> tuple[dict, Callable[[np.ndarray], np.ndarray]]:
    """(chosen hyper-parameters, rows -> predicted class) of Demo baseline `name`, fitted on
    the training rows and chosen on the validation rows (rows: train, valid)."""
    y, classes = task.labels[label]
    k = len(classes)
    train, valid = rows
    if name == "majority":
        majority = int(np.bincount(y[train], minlength=k).argmax())
        return {"class": classes[majority]}, lambda r: np.full(len(r), majority)
    if name == "tfidf_lr":
        x, model, chosen = _tfidf_lr(task, y, train, valid, k, select, seed)
    elif name == "svd_lr":
        if factors is None:
            raise ValueError("svd_lr needs the unlabeled corpus's factors (fit_factors)")
        x, model, chosen = _svd_lr(task, factors, y, rows, k, select, seed)
    else:
        raise ValueError(f"unknown Demo baseline {name!r}; choose from {list(DEMO_BASELINES)}")
    return chosen, lambda r: model.predict(x[r]) if len(r) else np.zeros(0, dtype=np.int64)


# ---------------------------------------------------------------- CTR


def _ctr_scores(y: np.ndarray, s: np.ndarray) -> dict[str, float]:
    return {"auc": roc_auc(y, s), "ap": average_precision(y, s)}


# (chosen hyper-parameters, rows -> scores): one candidate setting of a CTR baseline.
_Candidate = tuple[dict, Callable[..., np.ndarray]]


def run_ctr_baseline(
    name: str, task: CtrTask, ratio: float, *, seed: int, factors: Factors | None = None
) -> dict:
    """One CTR baseline cell on `task`'s current split (see CtrTask.resplit): the candidate
    setting with the best validation AUC scores the test split; `factors`: the unlabeled
    corpus's latent factors (svd_feature_lr)."""
    d = task.data
    y = d.clicked
    train = np.flatnonzero(task.subsets[ratio])
    valid = np.flatnonzero(d.window == "valid")
    test = np.flatnonzero(d.window == "test")
    candidates = _ctr_candidates(name, task, train, seed, factors)
    chosen, score = max(candidates, key=lambda cand: roc_auc(y[valid], cand[1](valid)))
    s = np.round(np.asarray(score(test), dtype=np.float64), 6)  # as saved, so recomputable
    return {
        "valid": _ctr_scores(y[valid], score(valid)),
        "test": _ctr_scores(y[test], s),
        "pred": {"row": test.tolist(), "y": y[test].tolist(), "score": s.tolist()},
        "chosen": chosen,
        "n_train": len(train),
        "n_valid": len(valid),
        "n_test": len(test),
    }


def _ctr_candidates(
    name: str, task: CtrTask, train: np.ndarray, seed: int, factors: Factors | None
) -> list[_Candidate]:
    """Every setting of baseline `name` fitted on the `train` impressions (the lambdas bind
    their parameters as defaults)."""
    d, y = task.data, task.data.clicked
    _, user_keys = np.unique(task.users, return_inverse=True)
    if name == "popularity":
        pop = np.where(
            d.window == "test",
            cast(np.ndarray, d.popularity_test)[d.item],
            cast(np.ndarray, d.popularity_train)[d.item],
        )
        return [({}, lambda rows: pop[rows])]
    if name in ("item_ctr", "user_ctr"):
        keys = d.item if name == "item_ctr" else user_keys
        return [
            ({"a": a}, lambda rows, a=a: _rate(keys, y, train, rows, a)) for a in SMOOTHING_GRID
        ]
    if name == "feature_lr":
        return _feature_lr_candidates(task, train, seed, [({}, None)])
    if name == "svd_feature_lr":
        if factors is None:
            raise ValueError("svd_feature_lr needs the unlabeled corpus's factors (fit_factors)")
        extras = [({"rank": r}, factor_score(task, factors, r)) for r in factors.ranks]
        return _feature_lr_candidates(task, train, seed, extras)
    if name == "id_lr":
        return _id_lr_candidates(d.item, user_keys, y, train, seed)
    raise ValueError(f"unknown CTR baseline {name!r}; choose from {list(CTR_BASELINES)}")


def _feature_lr_candidates(
    task: CtrTask, train: np.ndarray, seed: int, extras: Sequence[tuple[dict, np.ndarray | None]]
) -> list[_Candidate]:
    """feature_lr, plus each extra feature column (none: None) chosen as its dict says: one
    candidate per extra, smoothing a and C. The features of each a are computed once."""
    y = task.data.clicked
    features = {a: ctr_features(task, train, a, seed) for a in SMOOTHING_GRID}
    candidates: list[_Candidate] = []
    for (fixed, extra), a in ((e, a) for e in extras for a in SMOOTHING_GRID):
        x = features[a]
        if extra is not None:
            x = np.column_stack([x, extra])
        xs = StandardScaler().fit(x[train]).transform(x)
        for c in C_GRID:
            model = _fit(_logreg(c, None, seed), xs[train], y[train])
            candidates.append(
                (
                    {**fixed, "a": a, "C": c},
                    lambda rows, m=model, xs=xs: m.decision_function(xs[rows]),
                )
            )
    return candidates


def _id_lr_candidates(
    item: np.ndarray, user_keys: np.ndarray, y: np.ndarray, train: np.ndarray, seed: int
) -> list[_Candidate]:
    """Logistic regression on one-hot user id + item id, one candidate per C."""
    n_users = int(user_keys.max()) + 1
    rows_all = np.arange(len(y))
    x = sparse.csr_matrix(
        (
            np.ones(2 * len(y)),
            (np.concatenate([rows_all, rows_all]), np.concatenate([user_keys, n_users + item])),
        ),
        shape=(len(y), n_users + int(item.max()) + 1),
    )
    candidates: list[_Candidate] = []
    for c in C_GRID:
        model = _fit(_logreg(c, None, seed), x[train], y[train])
        candidates.append(({"C": c}, lambda rows, m=model: m.decision_function(x[rows])))
    return candidates
