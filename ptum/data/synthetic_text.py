"""The synthetic generator's text: pseudo-words built from syllables, item titles (mostly
their topic's words, Zipf within the topic) and ad titles. Part of ptum.data.synthetic's
generative model (items 1, 2 and 5 of its docstring); every function draws from the generator
it is given, in the order the caller fixes.
"""

from __future__ import annotations

import numpy as np

from ptum.data.synthetic_spec import SyntheticSpec

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


def words(rng: np.random.Generator, n: int, taken: set[str]) -> list[str]:
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


def zipf_cdf(n: int, s: float = 1.1) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return np.cumsum(w / w.sum())


def title(
    rng: np.random.Generator,
    topic_words: list[str],
    general: list[str],
    n_words: int,
    topic_share: float,
) -> str:
    cdf = zipf_cdf(len(topic_words), 0.9)
    words = []
    for _ in range(n_words):
        if rng.random() < topic_share:
            words.append(topic_words[int(np.searchsorted(cdf, rng.random()))])
        else:
            words.append(general[int(rng.integers(len(general)))])
    words[0] = words[0].capitalize()
    return " ".join(words)


def vocabulary(
    rng: np.random.Generator, spec: SyntheticSpec
) -> tuple[list[list[str]], list[str], list[str]]:
    """(words of each topic, general words, ad words): distinct pseudo-words."""
    taken: set[str] = set()
    topic_words = [words(rng, spec.words_per_topic, taken) for _ in range(spec.n_topics)]
    general = words(rng, spec.n_general_words, taken)
    ad_words = words(rng, 40, taken)
    return topic_words, general, ad_words


def items(
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
        titles.append(title(rng, topic_words[item_topic[i]], general, n_words, 0.7))
    shared = rng.random(n_items) < spec.shared_title_frac
    for dup in np.flatnonzero(shared):
        t = item_topic[dup]
        j = int(rng.integers(t * spec.n_items_per_topic, (t + 1) * spec.n_items_per_topic))
        titles[dup] = titles[j]
    return item_topic, titles


def ads(
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
        + title(rng, topic_words[t], general, int(rng.integers(4, 9)), 0.85).lower()
        for t in ad_topic
    ]
    ad_quality = rng.normal(0.0, 0.3, spec.n_ads)
    return ad_topic, ad_titles, ad_quality
