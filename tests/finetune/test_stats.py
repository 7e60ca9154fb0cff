"""The grid's statistics, checked against reference implementations (scipy, statsmodels)."""

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from ptum.finetune.metrics import accuracy, average_precision, macro_f1, roc_auc
from ptum.finetune.stats import (
    Predictions,
    UserBootstrap,
    bootstrap_ci,
    both_p,
    fragile,
    holm,
    interaction_test,
    paired_test,
    per_user_auc,
    weighted_ap,
    weighted_auc,
)
from ptum.finetune.stats import metric_values as values


def _data(n=300, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = y * 0.8 + rng.normal(size=n)
    if ties:
        s = np.round(s, 1)
    return y, s


@pytest.mark.parametrize("ties", [False, True])
def test_unit_weights_reproduce_the_plain_metrics(ties):
    y, s = _data(ties=ties)
    w = np.ones((1, len(y)))
    assert weighted_auc(y, s, w)[0] == pytest.approx(roc_auc(y, s), abs=1e-12)
    assert weighted_ap(y, s, w)[0] == pytest.approx(average_precision(y, s), abs=1e-12)
    pred = (s > 0.4).astype(int) + (s > 1.5)
    yk = y + (s > 2)
    assert values("acc", yk, pred, w)[0] == pytest.approx(accuracy(yk, pred))
    assert values("macro_f1", yk, pred, w, 3)[0] == pytest.approx(macro_f1(yk, pred, 3))


def test_integer_weights_equal_repeating_the_examples():
    y, s = _data(n=80, seed=1, ties=True)
    w = np.random.default_rng(2).integers(0, 3, len(y))
    rep_y, rep_s = np.repeat(y, w), np.repeat(s, w)
    assert weighted_auc(y, s, w[None])[0] == pytest.approx(roc_auc(rep_y, rep_s), abs=1e-12)
    assert weighted_ap(y, s, w[None])[0] == pytest.approx(
        average_precision(rep_y, rep_s), abs=1e-12
    )
    pred = (s > 0.4).astype(int)
    assert values("macro_f1", y, pred, w[None], 2)[0] == pytest.approx(
        macro_f1(rep_y, np.repeat(pred, w), 2)
    )


def test_bootstrap_ci_matches_scipy_percentile_bootstrap():
    """One repeat, one example per user: our resampling is scipy's percentile bootstrap."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 400)
    pred = np.where(rng.random(400) < 0.6, y, rng.integers(0, 3, 400))
    p = Predictions(y, pred, np.arange(400).astype(str))
    lo, hi = bootstrap_ci([p], "acc", n_boot=4000, seed=0)
    ref = stats.bootstrap(
        ((y == pred).astype(float),),
        np.mean,
        n_resamples=4000,
        method="percentile",
        random_state=0,
    ).confidence_interval
    assert lo == pytest.approx(ref.low, abs=0.01)
    assert hi == pytest.approx(ref.high, abs=0.01)
    assert lo < accuracy(y, pred) < hi


def test_bootstrap_resamples_users_not_impressions():
    """Impressions of one user move together: with users whose impressions are all alike,
    the CI is wider than when each impression is its own unit."""
    rng = np.random.default_rng(4)
    n_users, per_user = 40, 25
    user_effect = rng.normal(size=n_users)
    users = np.repeat(np.arange(n_users), per_user)
    y = (rng.random(len(users)) < 1 / (1 + np.exp(-2 * user_effect[users]))).astype(int)
    s = user_effect[users] + 0.1 * rng.normal(size=len(users))
    by_user = bootstrap_ci([Predictions(y, s, users)], "auc", n_boot=500, seed=0)
    by_imp = bootstrap_ci([Predictions(y, s, np.arange(len(y)))], "auc", n_boot=500, seed=0)
    assert by_user[1] - by_user[0] > 1.5 * (by_imp[1] - by_imp[0])


def test_holm_equals_statsmodels():
    p = np.array([0.01, 0.04, 0.03, 0.005, 0.5, 0.2])
    np.testing.assert_allclose(holm(p), multipletests(p, method="holm")[1])
    # An undefined p stays undefined but is one of the family's tests (counted as p = 1).
    with_nan = holm([0.01, np.nan, 0.04])
    assert np.isnan(with_nan[1])
    as_one = multipletests([0.01, 1.0, 0.04], method="holm")[1]
    np.testing.assert_allclose(with_nan[[0, 2]], as_one[[0, 2]])
    assert with_nan[2] == pytest.approx(0.08)


def test_paired_and_interaction_tests_are_scipy_t_tests():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=10) + 0.5, rng.normal(size=10)
    t = paired_test(a, b)
    assert t["p_ttest"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert t["wins"] == int((a > b).sum()) and t["n"] == 10
    ft_lo, sc_lo, ft_hi, sc_hi = (rng.normal(size=10) for _ in range(4))
    i = interaction_test(ft_lo + 1, sc_lo, ft_hi, sc_hi)
    dd = (ft_lo + 1 - sc_lo) - (ft_hi - sc_hi)
    assert i["mean_diff"] == pytest.approx(dd.mean())
    assert i["p_ttest"] == pytest.approx(stats.ttest_1samp(dd, 0).pvalue)


def test_per_user_auc_skips_users_with_one_class():
    y = np.array([1, 0, 1, 0, 1, 1, 0, 0])
    s = np.array([0.9, 0.1, 0.2, 0.8, 0.5, 0.6, 0.3, 0.4])
    u = np.array(["a", "a", "b", "b", "c", "c", "d", "d"])  # c: clicks only, d: none
    assert per_user_auc(y, s, u) == pytest.approx((1.0 + 0.0) / 2)


def _two_methods(seed: int, *, skill_a: float, skill_b: float, n: int = 300, reps: int = 8):
    """Two methods scored on the same n test users in every repeat (as CTR's one test window):
    each is right on a fixed set of users (drawn once with its skill) and a repeat flips 2% of
    its predictions. Returns (terms of A - B for UserBootstrap.contrast, per-repeat accuracies
    of A and of B)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    users = np.array([f"u{i}" for i in range(n)])
    right = {m: rng.random(n) < skill for m, skill in (("a", skill_a), ("b", skill_b))}
    reps_of: dict[str, list] = {"a": [], "b": []}
    acc: dict[str, list] = {"a": [], "b": []}
    for r in range(reps):
        for m in ("a", "b"):
            pred = np.where(right[m] ^ (rng.random(n) < 0.02), y, 1 - y)
            reps_of[m].append(((m, r), Predictions(y, pred, users)))
            acc[m].append(accuracy(y, pred))
    terms = [(1.0, reps_of["a"]), (-1.0, reps_of["b"])]
    return terms, np.array(acc["a"]), np.array(acc["b"]), users


def test_the_test_over_users_sees_the_luck_of_one_sample_that_repeats_cannot():
    """Equal skill, but A happens to be right on more of these 300 users (4 points): the
    repeats re-score the same users, so the paired t over repeats calls the luck a sure
    difference; the test over users does not. The null control showed this on real grids."""
    terms, a, b, users = _two_methods(1, skill_a=0.6, skill_b=0.6)
    u = UserBootstrap(users, n_boot=1000, seed=0).contrast(terms, "acc")
    assert u["diff"] == pytest.approx(float(np.mean(a - b)))
    assert u["diff"] > 0.03 and paired_test(a, b)["p_ttest"] < 1e-5
    # The standard error of a difference of two independent 60% accuracies on 300 users.
    assert u["se_users"] == pytest.approx(np.sqrt(2 * 0.6 * 0.4 / 300), rel=0.15)
    assert u["p_users"] > 0.2
    assert both_p(paired_test(a, b)["p_ttest"], u["p_users"]) == u["p_users"]


def test_the_test_over_users_detects_a_real_difference():
    terms, a, b, users = _two_methods(2, skill_a=0.8, skill_b=0.6)
    u = UserBootstrap(users, n_boot=1000, seed=0).contrast(terms, "acc")
    assert u["diff"] == pytest.approx(float(np.mean(a - b))) and u["diff"] > 0.1
    assert u["p_users"] < 1e-4


def test_identical_methods_have_no_users_p_and_a_cell_is_computed_once():
    terms, _, _, users = _two_methods(3, skill_a=0.7, skill_b=0.7)
    boot = UserBootstrap(users, n_boot=200, seed=0)
    same = boot.contrast([(1.0, terms[0][1]), (-1.0, terms[0][1])], "acc")
    assert same["diff"] == 0 and np.isnan(same["p_users"])
    assert np.isnan(both_p(0.01, same["p_users"])) and both_p(0.01, 0.2) == 0.2
    first = boot.replicates(*terms[0][1][0], "acc")
    assert boot.replicates(*terms[0][1][0], "acc")[1] is first[1]  # cached


def test_the_interval_over_users_matches_the_one_cell_bootstrap():
    terms, _, _, users = _two_methods(4, skill_a=0.7, skill_b=0.6)
    boot = UserBootstrap(users, n_boot=500, seed=0)
    assert boot.interval(terms[0][1], "acc") == bootstrap_ci(
        [p for _, p in terms[0][1]], "acc", n_boot=500, seed=0
    )


@pytest.mark.parametrize(
    ("p", "shaky"), [(0.001, False), (0.016, False), (0.02, True), (0.14, True), (0.2, False)]
)
def test_a_verdict_within_3x_of_alpha_is_fragile(p, shaky):
    assert fragile(p) is shaky
    assert fragile(None) is False and fragile(float("nan")) is False


def test_a_weightless_top_example_leaves_average_precision_defined():
    """A bootstrap replicate that does not draw the user of the highest score (about 1 in e of
    them) must score AP on the examples it drew, not nan."""
    y, s = _data(seed=6)
    w = np.ones(len(y))
    w[np.argmax(s)] = 0
    keep = w > 0
    assert weighted_ap(y, s, w[None])[0] == pytest.approx(average_precision(y[keep], s[keep]))
