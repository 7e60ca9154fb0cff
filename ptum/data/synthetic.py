"""Deterministic synthetic behavior log: the project's embedded default data source.

Generative model (documented in docs/data.md, "The synthetic generator", so results on it can be read):

1. Vocabulary. `n_topics` topics, each with `words_per_topic` pseudo-words; a shared pool of
   general words; a pool of ad words. Words are built from syllables, so titles look like text.
2. Items. Each item has one topic and a title of 4-12 words: ~70% drawn from its topic's words
   (Zipf within the topic), the rest general words. Item popularity is Zipf within each topic
   (popular head, long tail). A few percent of items reuse another item's title (shared titles).
3. Users and labels. Each user has a gender (2 classes) and an age bucket (4 classes). Every
   gender and every age bucket has its own random topic-affinity vector; a user's interest vector
   is drawn from a Dirichlet whose mean mixes uniform, gender and age affinities. So labels
   correlate with interests, but only through a noisy, sparse interest draw: they are not a
   function of the titles. Only `labeled_frac` of users publish labels (unlabeled users far
   outnumber labeled ones, as in the paper).
4. Behaviors. A user's sequence length is log-normal. Topics follow a sticky Markov chain
   (stay in the current topic with probability `stickiness`, else draw from the interest vector),
   which gives next-behavior prediction something to learn; the item is drawn by popularity
   within the topic; with probability `repeat_prob` the user revisits an earlier item. Timestamps
   come in sessions: short gaps (minutes) inside a session, long gaps (hours to days) between.
5. Ads. `n_ads` ads, each with a topic and a title of ad words plus topic words. Users in the
   ad audience see impressions at random times within their active span; an impression is
   clicked with probability sigmoid(-2.5 + 12 * interest[ad topic] + ad quality), ad quality
   ~ N(0, 0.3): CTR depends mostly on the user-ad topic match.
6. Controls for the statistics (three fields, all off by default; off, the draws are those of
   a spec without them). `null`: after every other draw, gender and age are re-drawn uniformly
   and clicks with one probability (the mean of the click probabilities above), from a stream
   of their own; behaviors, labeled users and impression times stay those of the spec without
   `null`. Labels and clicks are then independent of everything a model sees: any model's
   expected accuracy is 1/classes and its expected AUC 0.5. `niches`: group g = gender * 4 +
   age owns the topics t with t % 8 == g, and `label_signal` of a user's mean interest goes to
   their group's topics, so both labels follow from which topics a user browses.
   `labeled_history`: labeled users keep only their first N behaviors (light users), so the
   labeled set shows a few words of each topic, while the long histories of the unlabeled
   users show which words go together.

Same preset + seed -> identical tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from ptum.data.synthetic_spec import AGE_BUCKETS, GENDERS, PRESETS, SyntheticSpec, spec_for
from ptum.data.synthetic_text import ads, items, vocabulary, zipf_cdf

__all__ = ["AGE_BUCKETS", "GENDERS", "PRESETS", "SyntheticSpec", "generate", "spec_for"]

EPOCH0 = 1_700_000_000  # timestamps start here (2023-11-14), seconds


def generate(
    spec: SyntheticSpec, seed: int, latent: dict | None = None
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Generate (behaviors, labels, impressions) in the generic format.

    Returns:
        behaviors: user_id str, timestamp i64 (s), text str — one row per behavior.
        labels: user_id str, gender str, age str — labeled users only.
        impressions: user_id str, timestamp i64, text str, clicked i8.

    If `latent` is a dict, it receives the hidden variables (interest, topics, click
    probabilities), so analyses can measure what an ideal model could reach.
    """
    # One generator drawn in a fixed order (vocabulary, items, users, behaviors, labels, ads,
    # impressions): the order is part of "same preset + seed -> identical tables".
    rng = np.random.default_rng(seed)
    topic_words, general, ad_words = vocabulary(rng, spec)
    item_topic, titles = items(rng, spec, topic_words, general)
    gender, age, interest = _users(rng, spec)
    seq = _sequences(rng, spec, interest)

    user_ids = np.array([f"u{u:07d}" for u in range(spec.n_users)])
    labeled = rng.random(spec.n_users) < spec.labeled_frac  # (U,) who publish their labels
    behaviors = _behavior_table(seq, user_ids, titles, labeled, spec.labeled_history)
    ad_topic, ad_titles, ad_quality = ads(rng, spec, ad_words, topic_words, general)
    imp_user, imp_ad, imp_ts = _impression_events(rng, spec, seq)
    logit = -2.5 + 12.0 * interest[imp_user, ad_topic[imp_ad]] + ad_quality[imp_ad]
    click_prob = 1 / (1 + np.exp(-logit))
    clicked = (rng.random(len(imp_user)) < click_prob).astype(np.int8)
    if spec.null:
        gender, age, click_prob, clicked = _null_labels(seed, spec, click_prob)
    labels = _labels(user_ids, labeled, gender, age)
    if latent is not None:
        latent.update(
            interest=interest,
            item_topic=item_topic,
            ad_topic=ad_topic,
            impression_user=imp_user,
            impression_ad=imp_ad,
            click_prob=click_prob,
            gender=gender,
            age=age,
            titles=titles,
            ad_titles=ad_titles,
        )
    impressions = pl.DataFrame(
        {
            "user_id": user_ids[imp_user],
            "timestamp": imp_ts,
            "text": pl.Series(ad_titles, dtype=pl.String).gather(imp_ad),
            "clicked": clicked,
        }
    )
    return behaviors, labels, impressions


def _behavior_table(
    seq: _Sequences, user_ids: np.ndarray, titles: list[str], labeled: np.ndarray, history: int
) -> pl.DataFrame:
    """The behaviors table, user-major; with `history` > 0 the `labeled` users keep only their
    first `history` behaviors."""
    behaviors = pl.DataFrame(
        {
            "user_id": user_ids[seq.owner],
            "timestamp": seq.timestamp.astype(np.int64),
            "text": pl.Series("text", titles, dtype=pl.String).gather(seq.item),
        }
    )
    if history:
        pos = np.arange(len(seq.owner)) - seq.starts[seq.owner]
        behaviors = behaviors.filter(~labeled[seq.owner] | (pos < history))
    return behaviors


def _users(
    rng: np.random.Generator, spec: SyntheticSpec
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gender (U,), age bucket (U,), interest (U, T)): each user's labels and the topic
    interest drawn around the affinities of those labels."""
    U, T = spec.n_users, spec.n_topics
    gender = rng.choice(2, size=U, p=[0.42, 0.58])
    age = rng.choice(4, size=U, p=[0.08, 0.32, 0.35, 0.25])
    sig = spec.label_signal
    if spec.niches:
        # Group g = gender * 4 + age owns the topics t with t % 8 == g (its niches).
        group = gender * len(AGE_BUCKETS) + age  # (U,)
        own = np.arange(T) % (len(GENDERS) * len(AGE_BUCKETS)) == group[:, None]  # (U, T)
        mean = (1 - sig) / T + sig * own / own.sum(1, keepdims=True)
    else:
        aff_gender = rng.dirichlet(np.ones(T) * 0.3, size=2)
        aff_age = rng.dirichlet(np.ones(T) * 0.3, size=4)
        mean = (1 - sig) / T + sig / 2 * (aff_gender[gender] + aff_age[age])  # (U, T)
    alpha = np.maximum(spec.interest_concentration * T * mean, 1e-3)
    interest = np.stack([rng.dirichlet(a) for a in alpha])  # (U, T)
    return gender, age, interest


def _null_labels(
    seed: int, spec: SyntheticSpec, click_prob: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The null control's (gender (U,), age (U,), click probability (M,), clicked (M,)):
    uniform classes and one click probability (the mean of `click_prob`), drawn from a stream
    of their own after every other draw, so nothing a model sees tells them apart."""
    rng = np.random.default_rng([seed, 1])
    gender = rng.integers(len(GENDERS), size=spec.n_users)
    age = rng.integers(len(AGE_BUCKETS), size=spec.n_users)
    p = np.full(len(click_prob), click_prob.mean() if len(click_prob) else 0.0)
    return gender, age, p, (rng.random(len(p)) < p).astype(np.int8)


def _labels(
    user_ids: np.ndarray, labeled: np.ndarray, gender: np.ndarray, age: np.ndarray
) -> pl.DataFrame:
    """The labels table: the users who publish theirs (`labeled`, (U,) bool)."""
    return pl.DataFrame(
        {
            "user_id": user_ids[labeled],
            "gender": np.array(GENDERS)[gender[labeled]],
            "age": np.array(AGE_BUCKETS)[age[labeled]],
        }
    )


@dataclass(frozen=True)
class _Sequences:
    """Every user's behaviors, user-major (N = total behaviors)."""

    lengths: np.ndarray  # (U,) behaviors per user
    starts: np.ndarray  # (U,) index of each user's first behavior
    owner: np.ndarray  # (N,) user of each behavior
    item: np.ndarray  # (N,) item of each behavior
    timestamp: np.ndarray  # (N,) seconds, increasing within a user


def _sequences(rng: np.random.Generator, spec: SyntheticSpec, interest: np.ndarray) -> _Sequences:
    """Behaviors, vectorised over all users at once: a sticky Markov chain over topics, items
    by popularity within the topic, some revisits, timestamps in sessions."""
    U, T = spec.n_users, spec.n_topics
    interest_cdf = np.cumsum(interest, axis=1)
    interest_cdf[:, -1] = 1.0
    item_cdf = zipf_cdf(spec.n_items_per_topic)
    lengths = np.clip(
        rng.lognormal(np.log(spec.mean_behaviors) - 0.32, 0.8, size=U), 3, 8 * spec.mean_behaviors
    ).astype(np.int64)
    owner = np.repeat(np.arange(U), lengths)  # (N,)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    n = int(lengths.sum())
    pos = np.arange(n) - starts[owner]
    fresh = (interest_cdf[owner] < rng.random(n)[:, None]).sum(axis=1)  # topic ~ interest
    fresh = np.minimum(fresh, T - 1)
    stay = (rng.random(n) < spec.stickiness) & (pos > 0)
    src = np.maximum.accumulate(np.where(stay, 0, np.arange(n)))
    topic = fresh[src]
    rank = np.minimum(np.searchsorted(item_cdf, rng.random(n)), spec.n_items_per_topic - 1)
    item = topic * spec.n_items_per_topic + rank
    lag = rng.geometric(0.3, size=n)
    repeat = (rng.random(n) < spec.repeat_prob) & (lag <= pos)
    item = np.where(repeat, item[np.arange(n) - np.where(repeat, lag, 0)], item)
    ts = _session_times(rng, pos, starts, lengths)
    return _Sequences(lengths=lengths, starts=starts, owner=owner, item=item, timestamp=ts)


def _session_times(
    rng: np.random.Generator, pos: np.ndarray, starts: np.ndarray, lengths: np.ndarray
) -> np.ndarray:
    """Timestamps (N,) of behaviors at positions `pos` within their user's sequence: short gaps
    (minutes) inside a session, long gaps (hours to days) between, a random first day."""
    n = len(pos)
    in_session = rng.random(n) < 0.75
    gaps = np.where(in_session, rng.exponential(120.0, n), rng.exponential(20 * 3600.0, n))
    gaps = np.where(pos == 0, rng.uniform(0, 10 * 86400.0, n), gaps).astype(np.int64) + 1
    cum = np.cumsum(gaps)
    return EPOCH0 + cum - np.repeat(cum[starts] - gaps[starts], lengths)


def _impression_events(
    rng: np.random.Generator, spec: SyntheticSpec, seq: _Sequences
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user, ad, timestamp) of each impression (M,): the audience's users see random ads at
    random times within their active span (no two on the same user, ad and second)."""
    audience = np.flatnonzero(rng.random(spec.n_users) < spec.audience_frac)
    n_imp = rng.poisson(spec.mean_impressions, size=len(audience)) + 1
    imp_user = np.repeat(audience, n_imp)
    ts, starts, lengths = seq.timestamp, seq.starts, seq.lengths
    first = ts[starts[imp_user]]
    last = ts[starts[imp_user] + lengths[imp_user] - 1]
    imp_ts = (first + rng.random(len(imp_user)) * (last - first + 3600)).astype(np.int64)
    imp_ad = rng.integers(spec.n_ads, size=len(imp_user))
    return imp_user, imp_ad, _distinct_events(imp_user, imp_ad, imp_ts)


def _distinct_events(user: np.ndarray, ad: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Timestamps where an impression repeating an earlier one's (user, ad, second) moves one
    second later, until none repeats: such a pair would be a duplicate event to `prepare`
    (a few in 6M impressions at 30M behaviors). Unchanged when there is none."""
    ts = ts.copy()
    while True:
        order = np.lexsort((np.arange(len(ts)), ts, ad, user))
        u, a, t = user[order], ad[order], ts[order]
        same = (u[1:] == u[:-1]) & (a[1:] == a[:-1]) & (t[1:] == t[:-1])
        if not same.any():
            return ts
        ts[order[1:][same]] += 1
