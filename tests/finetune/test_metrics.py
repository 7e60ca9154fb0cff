"""Our metric definitions against scikit-learn on fixed arrays."""

import numpy as np
import pytest
from sklearn import metrics as skm

from ptum.finetune.metrics import accuracy, average_precision, macro_f1, roc_auc

rng = np.random.default_rng(0)
Y3 = rng.integers(0, 3, 200)
P3 = np.where(rng.random(200) < 0.6, Y3, rng.integers(0, 3, 200))
YB = rng.integers(0, 2, 300)
SB = YB * 0.3 + rng.random(300)
ST = np.round(SB, 1)  # many ties


def test_accuracy_and_macro_f1():
    assert accuracy(Y3, P3) == pytest.approx(skm.accuracy_score(Y3, P3))
    assert macro_f1(Y3, P3, 3) == pytest.approx(skm.f1_score(Y3, P3, average="macro"))
    # A class never predicted and never true does not count (scikit-learn's labels=None).
    y, p = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])
    assert macro_f1(y, p, 4) == pytest.approx(skm.f1_score(y, p, average="macro"))
    # A class that is true but never predicted counts as F1 = 0.
    y, p = np.array([0, 1, 2, 2]), np.array([0, 1, 1, 1])
    assert macro_f1(y, p, 3) == pytest.approx(skm.f1_score(y, p, average="macro"))


@pytest.mark.parametrize("score", [SB, ST])
def test_auc_and_ap(score):
    assert roc_auc(YB, score) == pytest.approx(skm.roc_auc_score(YB, score))
    assert average_precision(YB, score) == pytest.approx(skm.average_precision_score(YB, score))


def test_degenerate_auc_is_nan():
    assert np.isnan(roc_auc(np.ones(5), np.arange(5)))
