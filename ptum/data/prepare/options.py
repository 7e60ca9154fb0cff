"""The options of `prepare`: what the prepare library reads, one field per `prepare.*` key it
uses (`ptum.stages.prepare.prepare_options` builds them from params.yaml; no defaults here, so
params.yaml is the one place a value is chosen)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class PrepareOptions:
    """The explicit arguments of `ptum.data.prepare.prepare` (params.yaml documents each key)."""

    # Longest sequence kept per view (the last max_behaviors behaviors).
    max_behaviors: int
    on_bad_rows: str  # error | quarantine
    on_duplicates: str  # drop | error
    # Fractions of impressions (by time rank) in the CTR-train and CTR-test windows.
    ctr_train_frac: float
    ctr_test_frac: float
    # Share of CTR-train-window impressions held out for validation.
    ctr_valid_frac: float
    # Labeled users: train / validation / test shares.
    demo_split: tuple[float, float, float]
    # Nested training-label subsets (fractions of the training users / impressions).
    label_ratios: tuple[float, ...]
    # Share of pre-training users held out to measure MBP/NBP accuracy.
    pretrain_valid_frac: float
    seed: int
    # A behaviors table with more rows is processed in chunks of whole users of about this size.
    chunk_rows: int
