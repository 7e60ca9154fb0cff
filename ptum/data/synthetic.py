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

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import polars as pl

from ptum.data.synthetic_spec import AGE_BUCKETS, GENDERS, PRESETS, SyntheticSpec, spec_for
from ptum.data.synthetic_text import ads, items, vocabulary, zipf_cdf

__all__ = [
    "AGE_BUCKETS",
    "GENDERS",
    "PRESETS",
    "SyntheticSpec",
    "generate",
    "generate_chunks",
    "spec_for",
]

EPOCH0 = 1_700_000_000  # timestamps start here (2023-11-14), seconds
# Behaviors per step of the per-behavior draws (a few (rows, n_topics) float64 temporaries).
STEP_ROWS = 1_000_000
# Behaviors per chunk of `generate_chunks` (whole users; ingest writes one Parquet row group
# each). Every preset but `paper` fits in one, so its file is the one-frame file it always was.
CHUNK_ROWS = 4_000_000


def generate(
    spec: SyntheticSpec, seed: int, latent: dict | None = None
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Generate (behaviors, labels, impressions) in the generic format.

    Returns:
        behaviors: user_id str, timestamp i64 (s), text str — one row per behavior.
        labels: user_id str, gender str, age str — labeled users only.
        impressions: user_id str, timestamp i64, text str, clicked i8.

    If `latent` is a dict, it receives the hidden variables (interest, topics, click
    probabilities), so analyses can measure what an ideal model could reach. The whole log in
    memory: for a big one (the `paper` preset), `generate_chunks`.
    """
    chunks, labels, impressions = generate_chunks(spec, seed, latent)
    return pl.concat(list(chunks), rechunk=True), labels, impressions


def generate_chunks(
    spec: SyntheticSpec, seed: int, latent: dict | None = None, chunk_rows: int | None = None
) -> tuple[Iterator[pl.DataFrame], pl.DataFrame, pl.DataFrame]:
    """`generate`'s tables with the behaviors as an iterator of frames of whole users (user
    order, each about `chunk_rows` rows, default CHUNK_ROWS; concatenated, they are
    `generate`'s behaviors).

    Every draw is made before this returns; the per-behavior strings (user ids, titles) are
    built one chunk at a time as the iterator is consumed. What stays whole in memory is a few
    bytes per behavior (item int32, time offset int32).
    """
    # One generator drawn in a fixed order (vocabulary, items, users, behaviors, labels, ads,
    # impressions): the order is part of "same preset + seed -> identical tables".
    rng = np.random.default_rng(seed)
    topic_words, general, ad_words = vocabulary(rng, spec)
    item_topic, titles = items(rng, spec, topic_words, general)
    gender, age, interest = _users(rng, spec)
    seq = _sequences(rng, spec, interest)
    labeled = rng.random(spec.n_users) < spec.labeled_frac  # (U,) who publish their labels
    ad_topic, ad_titles, ad_quality = ads(rng, spec, ad_words, topic_words, general)
    imp_user, imp_ad, imp_ts = _impression_events(rng, spec, seq)
    logit = -2.5 + 12.0 * interest[imp_user, ad_topic[imp_ad]] + ad_quality[imp_ad]
    click_prob = 1 / (1 + np.exp(-logit))
    clicked = (rng.random(len(imp_user)) < click_prob).astype(np.int8)
    if spec.null:
        gender, age, click_prob, clicked = _null_labels(seed, spec, click_prob)
    labels = _labels(labeled, gender, age)
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
            "user_id": _user_ids(imp_user),
            "timestamp": imp_ts,
            "text": pl.Series(ad_titles, dtype=pl.String).gather(imp_ad),
            "clicked": clicked,
        }
    )
    text = pl.Series("text", titles, dtype=pl.String)
    chunks = (
        _behavior_chunk(seq, text, labeled, spec.labeled_history, u0, u1)
        for u0, u1 in _user_ranges(seq.lengths, chunk_rows or CHUNK_ROWS)
    )
    return chunks, labels, impressions


def _user_ids(users: np.ndarray) -> pl.Series:
    """The id strings "u0000042" of user indices (any shape-(k,) integer array)."""
    return "u" + pl.Series("user_id", users, dtype=pl.Int64).cast(pl.String).str.zfill(7)


def _behavior_chunk(
    seq: _Sequences, text: pl.Series, labeled: np.ndarray, history: int, u0: int, u1: int
) -> pl.DataFrame:
    """The behaviors of users u0..u1-1, user-major; with `history` > 0 the `labeled` users
    keep only their first `history` behaviors."""
    lengths = seq.lengths[u0:u1]
    s0, s1 = int(seq.starts[u0]), int(seq.starts[u0] + lengths.sum())
    owner = np.repeat(np.arange(u1 - u0), lengths)  # (n,) user within the chunk
    behaviors = pl.DataFrame(
        {
            "user_id": _user_ids(np.arange(u0, u1)).gather(owner),
            "timestamp": EPOCH0 + seq.offset[s0:s1].astype(np.int64),
            "text": text.gather(seq.item[s0:s1]),
        }
    )
    if history:
        pos = _positions(lengths)
        behaviors = behaviors.filter(~labeled[u0:u1][owner] | (pos < history))
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
    interest = np.empty((U, T))  # (U, T)
    for u in range(U):
        interest[u] = rng.dirichlet(alpha[u])
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


def _labels(labeled: np.ndarray, gender: np.ndarray, age: np.ndarray) -> pl.DataFrame:
    """The labels table: the users who publish theirs (`labeled`, (U,) bool)."""
    return pl.DataFrame(
        {
            "user_id": _user_ids(np.flatnonzero(labeled)),
            "gender": np.array(GENDERS)[gender[labeled]],
            "age": np.array(AGE_BUCKETS)[age[labeled]],
        }
    )


@dataclass(frozen=True)
class _Sequences:
    """Every user's behaviors, user-major (N = total behaviors), a few bytes per behavior."""

    lengths: np.ndarray  # (U,) int64 behaviors per user
    starts: np.ndarray  # (U,) int64 index of each user's first behavior
    item: np.ndarray  # (N,) int32 item of each behavior
    offset: np.ndarray  # (N,) int32 timestamp - EPOCH0, seconds, increasing within a user


def _sequences(rng: np.random.Generator, spec: SyntheticSpec, interest: np.ndarray) -> _Sequences:
    """Behaviors: a sticky Markov chain over topics, items by popularity within the topic, some
    revisits, timestamps in sessions.

    Each random quantity is one whole-array draw of N values, in a fixed order; a draw is made
    in steps of whole users (STEP_ROWS behaviors), which gives the same values (a generator
    draws element by element), and everything else is per user, so no (N, T) array is needed.
    """
    T, per_topic = spec.n_topics, spec.n_items_per_topic
    interest_cdf = np.cumsum(interest, axis=1)
    interest_cdf[:, -1] = 1.0
    item_cdf = zipf_cdf(per_topic)
    lengths = np.clip(
        rng.lognormal(np.log(spec.mean_behaviors) - 0.32, 0.8, size=spec.n_users),
        3,
        8 * spec.mean_behaviors,
    ).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    steps = [
        (u0, u1, *_rows(starts, lengths, u0, u1)) for u0, u1 in _user_ranges(lengths, STEP_ROWS)
    ]
    n = int(lengths.sum())
    topic = np.empty(n, dtype=np.int16 if T <= np.iinfo(np.int16).max else np.int32)
    for u0, u1, s0, s1 in steps:  # topic ~ interest
        fresh = (
            interest_cdf[np.repeat(np.arange(u0, u1), lengths[u0:u1])]
            < rng.random(s1 - s0)[:, None]
        ).sum(axis=1)
        topic[s0:s1] = np.minimum(fresh, T - 1)
    for u0, u1, s0, s1 in steps:  # stay in the topic, or take the fresh one
        pos = _positions(lengths[u0:u1])
        stay = (rng.random(s1 - s0) < spec.stickiness) & (pos > 0)
        topic[s0:s1] = topic[s0:s1][np.maximum.accumulate(np.where(stay, 0, np.arange(s1 - s0)))]
    item = np.empty(n, dtype=np.int32)
    for _, _, s0, s1 in steps:  # the item, by popularity within the topic
        rank = np.minimum(np.searchsorted(item_cdf, rng.random(s1 - s0)), per_topic - 1)
        item[s0:s1] = topic[s0:s1].astype(np.int64) * per_topic + rank
    del topic
    lag = np.concatenate([_narrow(rng.geometric(0.3, size=s1 - s0)) for *_, s0, s1 in steps])
    for u0, u1, s0, s1 in steps:  # revisits
        pos = _positions(lengths[u0:u1])
        repeat = (rng.random(s1 - s0) < spec.repeat_prob) & (lag[s0:s1] <= pos)
        back = np.arange(s1 - s0) - np.where(repeat, lag[s0:s1], 0)
        item[s0:s1] = np.where(repeat, item[s0:s1][back], item[s0:s1])
    del lag
    offset = _session_times(rng, steps, lengths)
    return _Sequences(lengths=lengths, starts=starts, item=item, offset=offset)


def _session_times(
    rng: np.random.Generator, steps: list[tuple[int, int, int, int]], lengths: np.ndarray
) -> np.ndarray:
    """Timestamps - EPOCH0 (N,) int32 of every behavior (`steps`: `_sequences`' user and row
    ranges): short gaps (minutes) inside a session, long gaps (hours to days) between, a
    random first day. Each gap is the whole seconds of its draw, plus one."""
    in_session = np.concatenate([rng.random(s1 - s0) < 0.75 for *_, s0, s1 in steps])
    gap = np.empty(len(in_session), dtype=np.int32)
    for *_, s0, s1 in steps:  # in a session: minutes
        gap[s0:s1] = np.where(in_session[s0:s1], rng.exponential(120.0, s1 - s0), 0)
    for *_, s0, s1 in steps:  # between sessions: hours to days
        far = ~in_session[s0:s1]
        gap[s0:s1][far] = rng.exponential(20 * 3600.0, s1 - s0)[far]
    del in_session
    for u0, u1, s0, s1 in steps:  # the first behavior: a random day
        first = _positions(lengths[u0:u1]) == 0
        gap[s0:s1][first] = rng.uniform(0, 10 * 86400.0, s1 - s0)[first]
        cum = np.cumsum(gap[s0:s1].astype(np.int64) + 1)
        local = np.concatenate([[0], np.cumsum(lengths[u0:u1])[:-1]])
        gap[s0:s1] = _narrow(
            cum - np.repeat(cum[local] - gap[s0:s1][local] - 1, lengths[u0:u1]), np.int32
        )
    return gap


def _narrow(a: np.ndarray, dtype: type = np.int16) -> np.ndarray:
    """`a` (integers) as `dtype`, refused where a value does not fit."""
    if len(a) and (a.max() > np.iinfo(dtype).max or a.min() < np.iinfo(dtype).min):
        raise OverflowError(f"values up to {a.max()} do not fit {np.dtype(dtype).name}")
    return a.astype(dtype)


def _user_ranges(lengths: np.ndarray, rows: int) -> list[tuple[int, int]]:
    """Consecutive user ranges [u0, u1) covering every user, each of about `rows` behaviors
    (at least one user)."""
    ends = np.cumsum(lengths)
    cuts = np.unique(np.searchsorted(ends, np.arange(rows, ends[-1], rows), side="right"))
    bounds = [0, *[int(c) for c in cuts if 0 < c < len(lengths)], len(lengths)]
    return list(zip(bounds[:-1], bounds[1:], strict=False))


def _rows(starts: np.ndarray, lengths: np.ndarray, u0: int, u1: int) -> tuple[int, int]:
    """The behavior rows [s0, s1) of users u0..u1-1."""
    return int(starts[u0]), int(starts[u1 - 1] + lengths[u1 - 1])


def _positions(lengths: np.ndarray) -> np.ndarray:
    """(sum(lengths),) each behavior's position within its user, for consecutive users."""
    local = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return np.arange(int(lengths.sum())) - np.repeat(local, lengths)


def _impression_events(
    rng: np.random.Generator, spec: SyntheticSpec, seq: _Sequences
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user, ad, timestamp) of each impression (M,): the audience's users see random ads at
    random times within their active span (no two on the same user, ad and second)."""
    audience = np.flatnonzero(rng.random(spec.n_users) < spec.audience_frac)
    n_imp = rng.poisson(spec.mean_impressions, size=len(audience)) + 1
    imp_user = np.repeat(audience, n_imp)
    first_row = seq.starts[imp_user]
    first = EPOCH0 + seq.offset[first_row].astype(np.int64)
    last = EPOCH0 + seq.offset[first_row + seq.lengths[imp_user] - 1].astype(np.int64)
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
