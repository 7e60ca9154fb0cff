"""A pre-training pool: which of the pre-training corpus's training users a pre-training sees.

The paper-regime experiment (`ptum regime`) pre-trains on pools of growing size around a fixed
labeled set: every pool holds the labeled users (those with a Demo label or a CTR impression;
their behaviors only — pre-training never reads a label) and then unlabeled users, drawn in one
seeded order, so that each pool contains every smaller one. The svd_* baselines factorize the
same pool (ptum.finetune.factors), so both ways of using unlabeled data see the same users.
Where every user is labeled (MovieLens-100K), a seeded subset of them stays labeled and the
others are unlabeled users of the pools (`labeled_users`' limit, regime.labeled_users).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from ptum.data import verified

SEED = 0  # the order in which unlabeled users join a pool: one fixed, label-free seed


def labeled_users(prepared: Path, limit: int | None = None) -> set[str]:
    """The users of the downstream tasks: a Demo label or at least one CTR impression. limit:
    keep only that many of them, drawn with the fixed seed (the others' labels and impressions
    are then never used: they join the pools as unlabeled users)."""
    ids: set[str] = set()
    for name in ("labels", "impressions"):
        frame = verified.read_parquet(prepared / f"{name}.parquet", "prepare", ["user_id"])
        ids.update(frame["user_id"].unique().to_list())
    if limit is None:
        return ids
    if not 1 <= limit <= len(ids):
        raise ValueError(
            f"{limit} labeled users: {prepared} has {len(ids)}; lower regime.labeled_users"
        )
    everyone = sorted(ids)
    return {everyone[i] for i in np.random.default_rng(SEED).permutation(len(everyone))[:limit]}


def pool_order(prepared: Path, labeled: int | None = None) -> tuple[list[str], int]:
    """(every training user of the pre-training corpus, labeled users first (by id), then the
    unlabeled ones in a seeded random order; how many labeled users lead it). The first n
    users are the pool of size n. labeled: as `labeled_users`' limit."""
    users = verified.read_parquet(prepared / "users.parquet", "prepare")
    train = users.filter(pl.col("pretrain_split") == "train")["user_id"].sort().to_list()
    kept = labeled_users(prepared, labeled)
    first = [u for u in train if u in kept]
    rest = [u for u in train if u not in kept]
    shuffled = [rest[i] for i in np.random.default_rng(SEED).permutation(len(rest))]
    return first + shuffled, len(first)


def pool_users(prepared: Path, size: int, labeled: int | None = None) -> list[str]:
    """The pool of `size` users (sorted by id, as the corpus loads them); ValueError when the
    corpus has fewer training users. labeled: as `labeled_users`' limit."""
    order, _ = pool_order(prepared, labeled)
    if not 1 <= size <= len(order):
        raise ValueError(
            f"a pre-training pool of {size} users: the corpus in {prepared} has {len(order)} "
            "training users; lower regime.pools or prepare more users"
        )
    return sorted(order[:size])


def users_digest(users: Sequence[str]) -> str:
    """SHA-256 of a set of user ids (order-free): what a checkpoint or a cache key records of
    a pool or a labeled subset."""
    return hashlib.sha256("\n".join(sorted(users)).encode()).hexdigest()
