"""The synthetic generator: deterministic, realistic shapes, labels tied to interests."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from ptum.data.synthetic import PRESETS, generate, spec_for


@pytest.fixture(scope="module")
def small():
    return generate(spec_for("small"), seed=3)


def test_deterministic():
    a = generate(spec_for("tiny"), seed=5)
    b = generate(spec_for("tiny"), seed=5)
    c = generate(spec_for("tiny"), seed=6)
    assert all(x.equals(y) for x, y in zip(a, b))
    assert not a[0].equals(c[0])


def test_shapes_and_realism(small):
    beh, labels, imps = small
    spec = PRESETS["small"]
    assert beh["user_id"].n_unique() == spec.n_users
    # Unlabeled users far outnumber labeled ones.
    assert labels.height < 0.3 * spec.n_users
    # Popular head and long tail; titles repeat and some distinct items share a title.
    counts = beh.group_by("text").len()["len"].sort(descending=True)
    assert counts[0] > 20 * counts.median()
    assert beh.height / beh["text"].n_unique() > 5
    # Session structure: many short gaps and some gaps longer than an hour.
    gaps = (
        beh.sort("user_id", "timestamp")
        .with_columns(g=pl.col("timestamp").diff().over("user_id"))
        .drop_nulls()["g"]
    )
    assert (gaps < 600).mean() > 0.5 and (gaps > 3600).mean() > 0.1
    assert set(imps["clicked"].unique()) == {0, 1}
    assert 0.05 < imps["clicked"].mean() < 0.6


def test_labels_correlate_with_behaviors_but_not_trivially(small):
    """A tf-idf logistic regression on held-out users beats the majority class on both labels,
    but is far from perfect: the labels are learnable from behaviors, not a function of them."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    beh, labels, _ = small
    docs = (
        beh.group_by("user_id")
        .agg(pl.col("text").str.join(" "))
        .join(labels, on="user_id")
        .sort("user_id")
    )
    X = TfidfVectorizer().fit_transform(docs["text"].to_list())
    half = docs.height // 2
    for col in ("gender", "age"):
        y = docs[col].to_numpy()
        model = LogisticRegression(max_iter=2000, C=3).fit(X[:half], y[:half])
        acc = (model.predict(X[half:]) == y[half:]).mean()
        _, counts = np.unique(y[half:], return_counts=True)
        majority = counts.max() / counts.sum()
        assert majority + 0.1 < acc < 0.9, (col, acc, majority)


def test_clicks_depend_on_topic_match():
    """Users click ads of the topics they browse more often than other ads."""
    beh, _, imps = generate(spec_for("small"), seed=4)
    first_word = lambda s: s.str.split(" ").list.get(-1)  # noqa: E731 - an ad's last word is a topic word
    seen = beh.with_columns(w=pl.col("text").str.to_lowercase().str.split(" ")).explode("w")
    seen = seen.select("user_id", "w").unique()
    imp = imps.with_columns(w=first_word(pl.col("text")), row=pl.int_range(pl.len()))
    matched = imp.join(seen, on=["user_id", "w"], how="semi")
    unmatched = imp.join(seen, on=["user_id", "w"], how="anti")
    assert matched["clicked"].mean() > unmatched["clicked"].mean() + 0.05


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown synthetic size 'huge'"):
        spec_for("huge")


def test_impressions_never_repeat_an_event():
    """Two impressions of one ad to one user in the same second would be a duplicate event to
    prepare (seen at 30M behaviors): the later ones move forward a second at a time."""
    from ptum.data.synthetic import _distinct_events

    user = np.array([0, 0, 0, 1, 0, 0])
    ad = np.array([5, 5, 5, 5, 5, 6])
    ts = np.array([10, 10, 11, 10, 10, 10])
    out = _distinct_events(user, ad, ts)
    assert out.tolist() == [10, 11, 12, 10, 13, 10]
    assert _distinct_events(user[3:], ad[3:], ts[3:]).tolist() == ts[3:].tolist()
    rng = np.random.default_rng(0)
    user, ad, ts = (rng.integers(0, k, 5_000) for k in (20, 5, 30))
    out = _distinct_events(user, ad, ts)
    assert len(set(zip(user, ad, out))) == len(out) and (out >= ts).all()
