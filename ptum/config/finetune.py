"""The sections of the stages that fine-tune grids of cells, `finetune@TASK`, `sensitivity` and
`regime`, with their range checks.

Each field's comment documents the key; the defaults are the root params.yaml's values
(`ptum.config.schema` gathers every section; constraints between sections are its `Params`'s).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ptum.config.errors import require, require_each, require_one_of, require_seed
from ptum.config.names import (
    ARCHITECTURE_NAMES,
    CLASS_WEIGHT_NAMES,
    EXECUTOR_NAMES,
    MODE_NAMES,
    TASK_NAMES,
)


@dataclass(frozen=True)
class FinetuneConfig:
    """Section of stage `finetune@TASK`: the grid task x model x mode x ratio x seed (Tables 2-3)."""

    # Paper Table 2: han, hura, hsa; Table 3: gru4rec, nativectr, bert4rec (`make paper`).
    demo_models: tuple[str, ...] = ("hsa",)
    ctr_models: tuple[str, ...] = ("nativectr",)
    modes: tuple[str, ...] = ("scratch", "frozen", "finetune")
    ratios: tuple[float, ...] = (0.2, 0.5, 1.0)
    repeats: int = 5  # re-drawn splits (paper: 10)
    seed: int = 100
    lr: float = 1e-3
    batch_size: int = 64
    max_epochs: int = 40
    patience: int = 8
    head_hidden: int = 200
    weight_decay: float = 0.0
    # Validation metric that selects the epoch on Demo tasks (CTR uses AUC).
    demo_select: Literal["acc", "macro_f1"] = "acc"
    # Parallel worker processes for independent cells (each uses one thread).
    workers: int = 2
    # Where the cells run: "local" (`workers` processes of this machine) or "dask" (a Dask
    # cluster: each worker process runs one cell at a time on one thread; the results are
    # the same either way). docs/evaluation.md#grid-on-a-dask-cluster.
    executor: str = "local"
    # dask: the scheduler's address (tcp://HOST:8786); "" starts a LocalCluster of `workers`
    # processes on 127.0.0.1. Its workers must see the data and checkpoints at the same paths.
    scheduler_address: str = ""
    # finetune mode only: the pre-trained user model trains at lr * encoder_lr_scale.
    encoder_lr_scale: float = 0.1
    # Demo loss class weighting tried by every neural cell ("none" | "balanced"); the cell keeps
    # the one with the best validation score (same selection budget in every mode).
    class_weights: tuple[str, ...] = ("none", "balanced")
    # CTR head: "dot" (paper: user . candidate) or "bias" (+ user bias and a per-item candidate
    # bias falling back to the item's popularity before the window; ptum.heads.BiasedCtrHead).
    ctr_scoring: Literal["dot", "bias"] = "bias"
    # "bias" head: the per-user / per-item offsets learn at lr * this.
    ctr_bias_lr_scale: float = 10.0
    # Demo heads also get the out-of-fold TF-IDF logistic-regression log-probabilities of the
    # user's bag of items (a "wide" input, the same in every mode).
    demo_wide: bool = True
    # Bootstrap replicates (over test users) of each cell's 95% CI.
    bootstrap: int = 1000

    def __post_init__(self) -> None:
        require(self.repeats >= 1, "finetune.repeats", self.repeats, "an integer >= 1")
        require_seed(self.seed, "finetune.seed")
        require(self.lr > 0, "finetune.lr", self.lr, "> 0")
        require(self.batch_size >= 1, "finetune.batch_size", self.batch_size, "an integer >= 1")
        require(self.max_epochs >= 1, "finetune.max_epochs", self.max_epochs, "an integer >= 1")
        require(self.patience >= 1, "finetune.patience", self.patience, "an integer >= 1")
        require(self.head_hidden >= 1, "finetune.head_hidden", self.head_hidden, ">= 1")
        require(self.weight_decay >= 0, "finetune.weight_decay", self.weight_decay, ">= 0")
        require(self.workers >= 1, "finetune.workers", self.workers, "an integer >= 1")
        require_one_of(self.executor, EXECUTOR_NAMES, "finetune.executor")
        require(
            self.executor == "dask" or not self.scheduler_address,
            "finetune.scheduler_address",
            self.scheduler_address,
            '"" unless finetune.executor is dask',
        )
        require(
            self.encoder_lr_scale >= 0, "finetune.encoder_lr_scale", self.encoder_lr_scale, ">= 0"
        )
        require(self.bootstrap >= 100, "finetune.bootstrap", self.bootstrap, ">= 100")
        require(
            self.ctr_bias_lr_scale > 0, "finetune.ctr_bias_lr_scale", self.ctr_bias_lr_scale, "> 0"
        )
        require_each(self.demo_models, ARCHITECTURE_NAMES, "finetune.demo_models")
        require_each(self.ctr_models, ARCHITECTURE_NAMES, "finetune.ctr_models")
        require_each(self.modes, MODE_NAMES, "finetune.modes")
        require_each(self.class_weights, CLASS_WEIGHT_NAMES, "finetune.class_weights")
        require(
            len(self.ratios) >= 1 and all(0 < r <= 1 for r in self.ratios),
            "finetune.ratios",
            self.ratios,
            "a non-empty list of shares in (0, 1]",
        )


@dataclass(frozen=True)
class SensitivityConfig:
    """Section of stage `sensitivity`: ablation (none/MBP/NBP/both), λ and K sweeps (Figs. 3-5)."""

    # The paper's: both tasks, BERT4Rec on CTR, λ in {0, 0.25, 0.5, 1, 2, 4}, K in 1..5
    # (experiments/*/params.yaml); the default is the quick subset.
    tasks: tuple[str, ...] = ("demo",)
    demo_model: str = "hsa"
    ctr_model: str = "nativectr"
    lams: tuple[float, ...] = (0.0, 1.0)
    ks: tuple[int, ...] = (2,)
    ratio: float = 0.2
    repeats: int = 3

    def __post_init__(self) -> None:
        require_each(self.tasks, TASK_NAMES, "sensitivity.tasks")
        require_one_of(self.demo_model, ARCHITECTURE_NAMES, "sensitivity.demo_model")
        require_one_of(self.ctr_model, ARCHITECTURE_NAMES, "sensitivity.ctr_model")


@dataclass(frozen=True)
class RegimeConfig:
    """Section of stage `regime`: pre-training pools of growing size around the fixed labeled
    set (the paper's regime: far more unlabeled users than labeled ones), one model per task."""

    # Pool sizes as multiples of the labeled users (a Demo label or a CTR impression); [] = the
    # stage runs nothing (the root default; experiments/synthetic-regime: [1, 5, 25]).
    pools: tuple[int, ...] = ()
    tasks: tuple[str, ...] = ("demo", "ctr")
    demo_model: str = "hsa"
    ctr_model: str = "nativectr"
    ratios: tuple[float, ...] = (0.2, 1.0)
    repeats: int = 5  # re-drawn splits, the same for every pool
    # Keep this many labeled users (seeded; the others' labels and impressions are dropped and
    # they join the pools unlabeled): where every user is labeled (MovieLens-100K). 0 = all.
    labeled_users: int = 0

    def __post_init__(self) -> None:
        require(self.labeled_users >= 0, "regime.labeled_users", self.labeled_users, ">= 0")
        require(
            all(m >= 1 for m in self.pools) and list(self.pools) == sorted(set(self.pools)),
            "regime.pools",
            self.pools,
            "increasing integers >= 1 (multiples of the labeled users)",
        )
        require_each(self.tasks, TASK_NAMES, "regime.tasks")
        require_one_of(self.demo_model, ARCHITECTURE_NAMES, "regime.demo_model")
        require_one_of(self.ctr_model, ARCHITECTURE_NAMES, "regime.ctr_model")
        require(self.repeats >= 2, "regime.repeats", self.repeats, "an integer >= 2 (paired)")
