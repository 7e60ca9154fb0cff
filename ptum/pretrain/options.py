"""The pre-training loop's explicit options, and the checks and settings around a run: the
device, whether the corpus can serve `p` negatives, deterministic mode."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ptum.data.corpus import Corpus


@dataclass(frozen=True, kw_only=True)
class TrainOptions:
    """Explicit arguments of the pre-training loop: params.yaml's `pretrain.*` keys of the same
    names (`ptum.stages.pretrain.train_options` builds them; no defaults of their own)."""

    mbp: bool
    nbp: bool
    k: int
    lam: float
    p: int
    negatives: str  # popularity | uniform
    lr: float
    weight_decay: float
    batch_size: int
    epochs: int
    seed: int
    grad_clip: float
    # Bit-identical runs: torch.use_deterministic_algorithms and a fixed thread count
    # (`pretrain(threads=...)`, default 1). Slower on a multi-core CPU.
    deterministic: bool
    # Stop after this many steps in total (0 = no limit); for tests and tuning, not in params.yaml.
    max_steps: int = 0

    def __post_init__(self) -> None:
        if not (self.mbp or self.nbp):
            raise ValueError("pretrain: at least one of mbp / nbp must be on")
        if self.k < 1 or self.p < 1:
            raise ValueError("pretrain.k and pretrain.p must be >= 1")
        if self.lam < 0:
            raise ValueError("pretrain.lam must be >= 0")
        if self.negatives not in ("popularity", "uniform"):
            raise ValueError("pretrain.negatives must be 'popularity' or 'uniform'")


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_negatives(corpus: Corpus, opts: TrainOptions, what: str = "training") -> None:
    """Refuse a `p` that the corpus cannot serve: P negatives per positive need more than P
    distinct items to draw from (a user's own items are never drawn)."""
    if opts.negatives == "popularity":
        n, source = int(np.unique(corpus.pool).size), "items of its behaviors"
    else:
        n, source = corpus.num_items, "items of the item table"
    if opts.p >= n and n < 2:
        raise ValueError(
            f"the {what} corpus has {n} distinct {source} (pretrain.negatives: "
            f"{opts.negatives}): too few to pre-train on; it needs users with at least 2 "
            f"behaviors over at least {opts.p + 1} distinct items: use more data"
        )
    if opts.p >= n:
        raise ValueError(
            f"pretrain.p = {opts.p}: the {what} corpus has only {n} distinct {source} "
            f"(pretrain.negatives: {opts.negatives}) to draw negatives from, one of them the "
            f"positive; use pretrain.p <= {max(n - 1, 1)}"
        )


@contextmanager
def deterministic_mode(on: bool, threads: int = 1) -> Iterator[None]:
    """Deterministic kernels and `threads` torch threads inside the block (restored after)."""
    if not on:
        yield
        return
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.get_num_threads(),
    )
    # cuBLAS needs a fixed workspace to be deterministic (read when CUDA initialises).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.set_num_threads(before[2])
