"""The synthetic generator's sizes and knobs (`SyntheticSpec`) and its presets (`data.size`):
what `ptum.data.synthetic.generate` draws from. The generative model: ptum.data.synthetic.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

GENDERS = ("F", "M")
AGE_BUCKETS = ("<20", "20-40", "40-60", ">60")


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
    # The controls for the statistics (module docstring, item 6); off, the draws are
    # those of a spec without these fields. niches: each (gender, age) group owns its own
    # topics; labeled_history: labeled users keep only their first N behaviors (0: all);
    # null: labels and clicks re-drawn independently of everything a model sees.
    niches: bool = False
    labeled_history: int = 0
    null: bool = False

    def __post_init__(self) -> None:
        groups = len(GENDERS) * len(AGE_BUCKETS)
        if self.niches and self.n_topics < groups:
            raise ValueError(
                f"niches needs n_topics >= {groups} (one per group), got {self.n_topics}"
            )
        if self.labeled_history < 0:
            raise ValueError(f"labeled_history must be >= 0, got {self.labeled_history}")


# The positive control (docs/data.md, "Controls for the statistics"): labels tied to niche
# topics, labeled users with 5 behaviors among unlabeled users with about 20. Sized for a test
# of seconds (tests/finetune/test_controls.py).
_POSITIVE = SyntheticSpec(
    n_users=1_000,
    mean_behaviors=20,
    n_items_per_topic=60,
    n_topics=8,
    words_per_topic=150,
    n_general_words=40,
    n_ads=30,
    labeled_frac=0.25,
    audience_frac=0.3,
    mean_impressions=12,
    label_signal=0.9,
    niches=True,
    labeled_history=5,
)

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
    # The paper's scale (its Table 1; docs/data.md, "The paper preset"): 500,000 users and
    # about 63M behaviors (mean 127 before the length's clipping and rounding: 126 realized),
    # 48,000 items, about 20,000 Demo-labeled users and a CTR audience of as many (~620,000
    # impressions). For benchmarks/paper_scale.py: ingest writes it in chunks of whole users.
    "paper": SyntheticSpec(
        n_users=500_000,
        mean_behaviors=127,
        n_items_per_topic=2_000,
        labeled_frac=0.04,
        audience_frac=0.04,
    ),
    # The controls for the statistics (tests/finetune/test_controls.py): the same behaviors and
    # labeled users; labels tied to behaviors (positive) or independent of them (null).
    "positive_control": _POSITIVE,
    "null_control": replace(_POSITIVE, null=True),
}


def spec_for(size: str, **overrides: Any) -> SyntheticSpec:
    """Look up a preset by name (clear error on unknown names), optionally overriding fields."""
    if size not in PRESETS:
        raise ValueError(f"unknown synthetic size {size!r}; presets: {sorted(PRESETS)}")
    return replace(PRESETS[size], **overrides)
