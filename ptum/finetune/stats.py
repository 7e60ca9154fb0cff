"""Statistics of the fine-tuning grid, from the saved per-example test predictions (torch-free).

Which level varies: a repeat r re-draws the labeled-user split (Demo) or the CTR-train/valid
split, and the model seeds; within a repeat, test users are a sample of users. So:

- mean ± std of a metric over repeats;
- a 95% CI per cell by a bootstrap over test *users* (CTR: a user's impressions move together),
  stratified by repeat: each replicate resamples the users of every repeat and averages the
  repeats' metrics;
- paired tests between methods over repeats (every method of repeat r saw the same split);
- the "larger gain with fewer labels" claim as an interaction: per repeat, the gain at the lowest
  ratio minus the gain at the highest, tested against 0;
- Holm's step-down correction over the family of claims tested.

Weighted metrics below take a (B, n) weight matrix (how often each example is drawn in each of B
replicates) and return (B,) values; with unit weights they equal ptum.finetune.metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from ptum.finetune.metrics import roc_auc


def _tie_groups(score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order ascending, start index of each run of equal scores in that order)."""
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    starts = np.r_[0, np.flatnonzero(np.diff(s) != 0) + 1]
    return order, starts


def weighted_auc(y: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """ROC AUC with example weights w (B, n); ties count one half. nan without both classes."""
    order, starts = _tie_groups(np.asarray(score, dtype=np.float64))
    yb = np.asarray(y)[order].astype(bool)
    w = np.atleast_2d(w)[:, order]
    pos = np.add.reduceat(w * yb, starts, axis=1)  # (B, G)
    neg = np.add.reduceat(w * ~yb, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    p_tot, n_tot = pos.sum(1), neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos * (below + 0.5 * neg)).sum(1) / (p_tot * n_tot)


def weighted_ap(y: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Average precision (as ptum.finetune.metrics) with example weights w (B, n)."""
    order, starts = _tie_groups(-np.asarray(score, dtype=np.float64))
    yf = np.asarray(y)[order].astype(np.float64)
    w = np.atleast_2d(w)[:, order]
    last = np.r_[starts[1:], len(yf)] - 1
    tp = np.cumsum(w * yf, axis=1)[:, last]  # (B, G)
    seen = np.cumsum(w, axis=1)[:, last]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = tp / seen
        recall = tp / tp[:, -1:]
    return np.sum(np.diff(recall, axis=1, prepend=0.0) * precision, axis=1)


def weighted_acc(y: np.ndarray, pred: np.ndarray, w: np.ndarray) -> np.ndarray:
    w = np.atleast_2d(w)
    return (w * (np.asarray(y) == np.asarray(pred))).sum(1) / w.sum(1)


def weighted_macro_f1(y: np.ndarray, pred: np.ndarray, w: np.ndarray, n_classes: int) -> np.ndarray:
    """Macro-F1 over classes present (with weight) in y or pred, as metrics.macro_f1."""
    w = np.atleast_2d(w)
    y, pred = np.asarray(y), np.asarray(pred)
    f1 = np.zeros((w.shape[0], n_classes))
    present = np.zeros((w.shape[0], n_classes), dtype=bool)
    for c in range(n_classes):
        tp = (w * ((pred == c) & (y == c))).sum(1)
        fp = (w * ((pred == c) & (y != c))).sum(1)
        fn = (w * ((pred != c) & (y == c))).sum(1)
        denom = 2 * tp + fp + fn
        present[:, c] = denom > 0
        f1[:, c] = np.where(denom > 0, 2 * tp / np.maximum(denom, 1e-12), 0.0)
    return f1.sum(1) / np.maximum(present.sum(1), 1)


def metric_values(metric: str, y, out, w: np.ndarray, n_classes: int = 0) -> np.ndarray:
    """(B,) values of `metric` (acc | macro_f1 | auc | ap) under weights w (B, n)."""
    if metric == "acc":
        return weighted_acc(y, out, w)
    if metric == "macro_f1":
        return weighted_macro_f1(y, out, w, n_classes)
    if metric == "auc":
        return weighted_auc(y, out, w)
    if metric == "ap":
        return weighted_ap(y, out, w)
    raise ValueError(f"unknown metric {metric!r}")


@dataclass(frozen=True)
class Predictions:
    """Test predictions of one cell in one repeat: per example its label, output (predicted
    class or score) and the user it belongs to (the bootstrap unit)."""

    y: np.ndarray
    out: np.ndarray
    user: np.ndarray


def bootstrap_ci(
    repeats: Sequence[Predictions],
    metric: str,
    *,
    n_classes: int = 0,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    chunk: int = 100,
) -> tuple[float, float]:
    """Percentile CI of the mean over repeats of `metric`, resampling test users with
    replacement within each repeat (all of a user's examples move together)."""
    rng = np.random.default_rng(seed)
    total = np.zeros(n_boot)
    for p in repeats:
        users, inverse = np.unique(p.user, return_inverse=True)
        for start in range(0, n_boot, chunk):
            b = min(chunk, n_boot - start)
            draws = rng.integers(0, len(users), (b, len(users)))
            counts = np.zeros((b, len(users)))
            np.add.at(counts, (np.repeat(np.arange(b), len(users)), draws.ravel()), 1.0)
            total[start : start + b] += metric_values(
                metric, p.y, p.out, counts[:, inverse], n_classes
            )
    mean = total / len(repeats)
    mean = mean[~np.isnan(mean)]
    if len(mean) == 0:
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    return float(np.quantile(mean, alpha)), float(np.quantile(mean, 1 - alpha))


def per_user_auc(y: np.ndarray, score: np.ndarray, user: np.ndarray) -> float:
    """Mean ROC AUC over users with both a click and a non-click (impressions grouped by user)."""
    order = np.argsort(user, kind="stable")
    y, score, user = np.asarray(y)[order], np.asarray(score)[order], np.asarray(user)[order]
    starts = np.r_[0, np.flatnonzero(user[1:] != user[:-1]) + 1, len(user)]
    aucs = [
        roc_auc(y[a:b], score[a:b])
        for a, b in zip(starts[:-1], starts[1:])
        if 0 < y[a:b].sum() < b - a
    ]
    return float(np.mean(aucs)) if aucs else float("nan")


def paired_test(a: np.ndarray, b: np.ndarray) -> dict:
    """a vs b paired by repeat: mean difference, wins, paired t-test and Wilcoxon p-values
    (two-sided; nan when undefined)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    d = a - b
    t_p = float(stats.ttest_rel(a, b).pvalue) if len(d) > 1 and d.std() > 0 else float("nan")
    w_p = float(stats.wilcoxon(a, b).pvalue) if len(d) > 1 and np.any(d != 0) else float("nan")
    return {
        "mean_diff": float(d.mean()) if len(d) else float("nan"),
        "wins": int((d > 0).sum()),
        "n": len(d),
        "p_ttest": t_p,
        "p_wilcoxon": w_p,
    }


def interaction_test(
    ft_lo: np.ndarray, sc_lo: np.ndarray, ft_hi: np.ndarray, sc_hi: np.ndarray
) -> dict:
    """Is the gain (ft - sc) larger at the low label ratio than at the high one? Difference in
    differences per repeat, paired t-test of gain_lo against gain_hi."""
    return paired_test(np.asarray(ft_lo) - np.asarray(sc_lo), np.asarray(ft_hi) - np.asarray(sc_hi))


def holm(p: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (nan stays nan and is not counted)."""
    ps = np.asarray(p, dtype=float)
    out = np.full(len(ps), np.nan)
    ok = np.flatnonzero(~np.isnan(ps))
    m = len(ok)
    order = ok[np.argsort(ps[ok], kind="mergesort")]
    running = 0.0
    for i, j in enumerate(order):
        running = max(running, min(1.0, (m - i) * ps[j]))
        out[j] = running
    return out
