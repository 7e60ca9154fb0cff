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

Same preset + seed -> identical tables.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import polars as pl

GENDERS = ("F", "M")
AGE_BUCKETS = ("<20", "20-40", "40-60", ">60")
EPOCH0 = 1_700_000_000  # timestamps start here (2023-11-14), seconds


@dataclass(frozen=True)
class SyntheticSpec:
    """Sizes and knobs of the synthetic generator."""

    n_users: int
    mean_behaviors: float
    n_items_per_topic: int
    n_topics: int = 24
    words_per_topic: int = 60
    n_general_words: int = 200
    n_ads: int = 300
    labeled_frac: float = 0.2
    audience_frac: float = 0.4
    mean_impressions: float = 30.0
    stickiness: float = 0.55
    repeat_prob: float = 0.08
    shared_title_frac: float = 0.03
    interest_concentration: float = 0.3
    # Weight of the gender/age topic affinities in the mean interest (rest is uniform).
    label_signal: float = 0.8


PRESETS: dict[str, SyntheticSpec] = {
    "tiny": SyntheticSpec(
        n_users=300,
        mean_behaviors=20,
        n_items_per_topic=15,
        n_topics=6,
        words_per_topic=20,
        n_general_words=40,
        n_ads=30,
        labeled_frac=0.5,
        audience_frac=0.5,
        mean_impressions=12,
    ),
    # The embedded default (params.yaml, DataConfig), sized so that the whole `dvc repro` stays
    # well under 15 minutes on 2 CPU cores (docs/benchmarks.md, "Wall time of make run").
    "small": SyntheticSpec(
        n_users=3_500, mean_behaviors=25, n_items_per_topic=60, labeled_frac=0.25
    ),
    # 6,000 users, the paper-scale grid: its result set is experiments/synthetic-default.
    "default": SyntheticSpec(
        n_users=6_000, mean_behaviors=30, n_items_per_topic=150, labeled_frac=0.25
    ),
    "large": SyntheticSpec(n_users=50_000, mean_behaviors=60, n_items_per_topic=400),
    # The paper's regime (experiments/synthetic-regime): few labeled users, a large unlabeled
    # pool. About 1,900 labeled users (a Demo label or CTR impressions) among 56,000, so that
    # pools of 1x, 5x and 25x them fit in the pre-training corpus's training users.
    "regime": SyntheticSpec(
        n_users=56_000,
        mean_behaviors=25,
        n_items_per_topic=150,
        labeled_frac=0.018,
        audience_frac=0.018,
    ),
}

_ONSETS = (
    "b",
    "c",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "st",
    "tr",
    "pl",
    "gr",
    "sh",
    "ch",
)
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ea")


def _words(rng: np.random.Generator, n: int, taken: set[str]) -> list[str]:
    """n distinct pseudo-words of 2-3 syllables, none in `taken` (which is updated)."""
    out: list[str] = []
    while len(out) < n:
        k = int(rng.integers(2, 4))
        w = "".join(
            _ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
            for _ in range(k)
        )
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


def _zipf_cdf(n: int, s: float = 1.1) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return np.cumsum(w / w.sum())


def _title(
    rng: np.random.Generator,
    topic_words: list[str],
    general: list[str],
    n_words: int,
    topic_share: float,
) -> str:
    cdf = _zipf_cdf(len(topic_words), 0.9)
    words = []
    for _ in range(n_words):
        if rng.random() < topic_share:
            words.append(topic_words[int(np.searchsorted(cdf, rng.random()))])
        else:
            words.append(general[int(rng.integers(len(general)))])
    words[0] = words[0].capitalize()
    return " ".join(words)


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
    topic_words, general, ad_words = _vocabulary(rng, spec)
    item_topic, titles = _items(rng, spec, topic_words, general)
    gender, age, interest = _users(rng, spec)
    seq = _sequences(rng, spec, interest)

    user_ids = np.array([f"u{u:07d}" for u in range(spec.n_users)])
    title_series = pl.Series("text", titles, dtype=pl.String)
    behaviors = pl.DataFrame(
        {
            "user_id": user_ids[seq.owner],
            "timestamp": seq.timestamp.astype(np.int64),
            "text": title_series.gather(seq.item),
        }
    )

    labels = _labels(rng, spec, user_ids, gender, age)

    ad_topic, ad_titles, ad_quality = _ads(rng, spec, ad_words, topic_words, general)
    imp_user, imp_ad, imp_ts = _impression_events(rng, spec, seq)
    logit = -2.5 + 12.0 * interest[imp_user, ad_topic[imp_ad]] + ad_quality[imp_ad]
    click_prob = 1 / (1 + np.exp(-logit))
    clicked = (rng.random(len(imp_user)) < click_prob).astype(np.int8)
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


def _vocabulary(
    rng: np.random.Generator, spec: SyntheticSpec
) -> tuple[list[list[str]], list[str], list[str]]:
    """(words of each topic, general words, ad words): distinct pseudo-words."""
    taken: set[str] = set()
    topic_words = [_words(rng, spec.words_per_topic, taken) for _ in range(spec.n_topics)]
    general = _words(rng, spec.n_general_words, taken)
    ad_words = _words(rng, 40, taken)
    return topic_words, general, ad_words


def _items(
    rng: np.random.Generator,
    spec: SyntheticSpec,
    topic_words: list[list[str]],
    general: list[str],
) -> tuple[np.ndarray, list[str]]:
    """(topic of each item (n_items,), titles). Topic-major layout: item i of topic t is
    t * n_items_per_topic + i, its popularity rank within the topic i."""
    n_items = spec.n_topics * spec.n_items_per_topic
    item_topic = np.repeat(np.arange(spec.n_topics), spec.n_items_per_topic)
    titles: list[str] = []
    for i in range(n_items):
        n_words = int(rng.integers(4, 13))
        titles.append(_title(rng, topic_words[item_topic[i]], general, n_words, 0.7))
    shared = rng.random(n_items) < spec.shared_title_frac
    for dup in np.flatnonzero(shared):
        t = item_topic[dup]
        j = int(rng.integers(t * spec.n_items_per_topic, (t + 1) * spec.n_items_per_topic))
        titles[dup] = titles[j]
    return item_topic, titles


def _users(
    rng: np.random.Generator, spec: SyntheticSpec
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gender (U,), age bucket (U,), interest (U, T)): each user's labels and the topic
    interest drawn around the affinities of those labels."""
    U, T = spec.n_users, spec.n_topics
    gender = rng.choice(2, size=U, p=[0.42, 0.58])
    age = rng.choice(4, size=U, p=[0.08, 0.32, 0.35, 0.25])
    aff_gender = rng.dirichlet(np.ones(T) * 0.3, size=2)
    aff_age = rng.dirichlet(np.ones(T) * 0.3, size=4)
    sig = spec.label_signal
    mean = (1 - sig) / T + sig / 2 * (aff_gender[gender] + aff_age[age])  # (U, T)
    alpha = np.maximum(spec.interest_concentration * T * mean, 1e-3)
    interest = np.stack([rng.dirichlet(a) for a in alpha])  # (U, T)
    return gender, age, interest


def _labels(
    rng: np.random.Generator,
    spec: SyntheticSpec,
    user_ids: np.ndarray,
    gender: np.ndarray,
    age: np.ndarray,
) -> pl.DataFrame:
    """The labels table: the `labeled_frac` of users (drawn at random) who publish theirs."""
    labeled = rng.random(spec.n_users) < spec.labeled_frac
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
    item_cdf = _zipf_cdf(spec.n_items_per_topic)
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


def _ads(
    rng: np.random.Generator,
    spec: SyntheticSpec,
    ad_words: list[str],
    topic_words: list[list[str]],
    general: list[str],
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(topic (n_ads,), title, quality (n_ads,)) of each ad: two ad words, then topic words."""
    ad_topic = rng.integers(spec.n_topics, size=spec.n_ads)
    ad_titles = [
        " ".join([ad_words[int(rng.integers(len(ad_words)))] for _ in range(2)]).capitalize()
        + " "
        + _title(rng, topic_words[t], general, int(rng.integers(4, 9)), 0.85).lower()
        for t in ad_topic
    ]
    ad_quality = rng.normal(0.0, 0.3, spec.n_ads)
    return ad_topic, ad_titles, ad_quality


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


def spec_for(size: str, **overrides: Any) -> SyntheticSpec:
    """Look up a preset by name (clear error on unknown names), optionally overriding fields."""
    if size not in PRESETS:
        raise ValueError(f"unknown synthetic size {size!r}; presets: {sorted(PRESETS)}")
    return replace(PRESETS[size], **overrides)
