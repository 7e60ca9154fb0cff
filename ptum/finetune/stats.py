"""Statistics of the fine-tuning grid, from the saved per-example test predictions (torch-free).

Which level varies: a repeat r re-draws the labeled-user split (Demo) or the CTR-train/valid
split, and the model seeds; within a repeat, test users are a sample of users. So:

- mean ± std of a metric over repeats;
- a 95% CI per cell by a bootstrap over test *users* (CTR: a user's impressions move together):
  each replicate resamples the task's test users once for every repeat and averages the
  repeats' metrics;
- paired tests between methods over repeats (every method of repeat r saw the same split);
- the same differences tested over test *users*: the repeats re-split one set
  of labeled users and score CTR on one test window, so a method's luck on that sample of users
  recurs in every repeat and the test over repeats cannot see it (`UserBootstrap`: users are
  resampled jointly across repeats and methods, paired; the difference's bootstrap standard error
  gives a normal p-value). A verdict needs both (`both_p`: the larger p, an intersection-union test);
- the "larger gain with fewer labels" claim as an interaction: per repeat, the gain at the lowest
  ratio minus the gain at the highest, tested against 0;
- Holm's step-down correction over the family of claims tested; a verdict whose adjusted p is
  within a factor of 3 of alpha is marked fragile (`fragile`).

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
        # A group with no weight yet above it (its users not drawn) adds no recall; its
        # precision is 0/0, taken as 0 so it does not turn the replicate into nan.
        precision = np.where(seen > 0, tp / seen, 0.0)
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
) -> tuple[float, float]:
    """Percentile CI of the mean over repeats of `metric`, resampling test users with
    replacement (all of a user's examples move together; a user in several repeats is drawn
    once for all of them): `UserBootstrap.interval` of one cell."""
    users = UserBootstrap(np.concatenate([p.user for p in repeats]), n_boot=n_boot, seed=seed)
    return users.interval([(i, p) for i, p in enumerate(repeats)], metric, n_classes, level)


def _user_counts(rng: np.random.Generator, b: int, n_users: int) -> np.ndarray:
    """(b, n_users) how often each user is drawn in each of b bootstrap replicates."""
    draws = rng.integers(0, n_users, (b, n_users)) + n_users * np.arange(b)[:, None]
    return np.bincount(draws.ravel(), minlength=b * n_users).reshape(b, n_users).astype(float)


class UserBootstrap:
    """Tests of differences over test users. One set of draws serves the whole grid: replicate b
    draws users with replacement from every test user of the task (a user's examples move
    together), the same draw for every cell and repeat, so differences stay paired on the same
    users and each (cell, repeat, metric) is computed once (`replicates`, cached)."""

    def __init__(self, users: np.ndarray, *, n_boot: int, seed: int, chunk: int = 100):
        self.users = np.unique(np.asarray(users, dtype=str))
        rng = np.random.default_rng(seed)
        self.counts = np.concatenate(
            [
                _user_counts(rng, min(chunk, n_boot - start), len(self.users))
                for start in range(0, n_boot, chunk)
            ]
        )
        self.chunk = chunk
        self._cache: dict[tuple, tuple[float, np.ndarray]] = {}

    def replicates(
        self, key: tuple | int, p: Predictions, metric: str, n_classes: int = 0
    ) -> tuple[float, np.ndarray]:
        """(the metric on p as it is, its (n_boot,) values under the draws); `key` names p."""
        if (key, metric) not in self._cache:
            idx = np.searchsorted(self.users, np.asarray(p.user, dtype=str))
            point = metric_values(metric, p.y, p.out, np.ones((1, len(idx))), n_classes)[0]
            boot = np.concatenate(
                [
                    metric_values(
                        metric, p.y, p.out, self.counts[s : s + self.chunk][:, idx], n_classes
                    )
                    for s in range(0, len(self.counts), self.chunk)
                ]
            )
            self._cache[(key, metric)] = (float(point), boot)
        return self._cache[(key, metric)]

    def interval(
        self,
        reps: Sequence[tuple[tuple | int, Predictions]],
        metric: str,
        n_classes: int = 0,
        level: float = 0.95,
    ) -> tuple[float, float]:
        """Percentile CI of one cell's mean over its repeats (`reps`: (key, predictions))."""
        boot = np.mean([self.replicates(k, p, metric, n_classes)[1] for k, p in reps], axis=0)
        boot = boot[~np.isnan(boot)]
        if len(boot) == 0:
            return float("nan"), float("nan")
        alpha = (1 - level) / 2
        return float(np.quantile(boot, alpha)), float(np.quantile(boot, 1 - alpha))

    def contrast(
        self,
        terms: Sequence[tuple[float, Sequence[tuple[tuple, Predictions]]]],
        metric: str,
        n_classes: int = 0,
    ) -> dict:
        """sum_k coef_k * (mean over repeats of `metric` of cell k; a term lists its repeats as
        (key, predictions)): diff, se_users (the replicates' standard deviation) and p_users
        (two-sided, normal; nan when se is 0 or undefined)."""
        diff, boot = 0.0, np.zeros(len(self.counts))
        for coef, reps in terms:
            values = [self.replicates(k, p, metric, n_classes) for k, p in reps]
            diff += coef * float(np.mean([v for v, _ in values]))
            boot = boot + coef * np.mean([b for _, b in values], axis=0)
        boot = boot[~np.isnan(boot)]
        se = float(boot.std(ddof=1)) if len(boot) > 1 else float("nan")
        ok = se > 0 and not np.isnan(diff)
        p = float(2 * stats.norm.sf(abs(diff) / se)) if ok else float("nan")
        return {"diff": diff, "se_users": se, "p_users": p}


def both_p(p_repeats: float | None, p_users: float | None) -> float:
    """A difference holds only if it holds over the re-drawn splits and over the test users:
    the larger of the two p-values (nan if either is undefined)."""
    ps = [np.nan if p is None else float(p) for p in (p_repeats, p_users)]
    return float("nan") if any(np.isnan(ps)) else max(ps)


def fragile(p_holm: float | None, alpha: float = 0.05, factor: float = 3.0) -> bool:
    """A verdict that a rerun on another machine or seed could flip: its adjusted p-value is
    within `factor` of alpha on either side."""
    return p_holm is not None and not np.isnan(p_holm) and alpha / factor < p_holm < alpha * factor


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
    """Holm's step-down adjusted p-values. An undefined p (nan: e.g. a difference with no
    spread over repeats) stays nan but counts as a test of the family (as p = 1), so it never
    makes the others' correction smaller."""
    ps = np.asarray(p, dtype=float)
    out = np.full(len(ps), np.nan)
    ok = np.flatnonzero(~np.isnan(ps))
    m = len(ps)
    order = ok[np.argsort(ps[ok], kind="mergesort")]
    running = 0.0
    for i, j in enumerate(order):
        running = max(running, min(1.0, (m - i) * ps[j]))
        out[j] = running
    return out
