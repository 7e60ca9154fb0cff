"""What one trial is: the search space it samples and the set-up it trains and scores with.

A trial pre-trains a user model with sampled K (next behaviors predicted), λ (NBP loss weight;
0 = MBP only), P (negatives per positive) and learning rate, then fine-tunes it briefly on the
demographic task (see `ptum.tune.objective`). `TrialSetup` holds everything else; a study's
name and identity are derived from it (`ptum.tune.study`).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import optuna
from tqdm import tqdm

from ptum.finetune.options import CellOptions
from ptum.pretrain.options import TrainOptions


def log(msg: str) -> None:
    """A line on stderr, through tqdm: a progress bar on the terminal is cleared, and redrawn
    below the line."""
    tqdm.write(msg, file=sys.stderr)


@dataclass(frozen=True, kw_only=True)
class SearchSpace:
    """What a trial samples: integer ranges are inclusive, lr is sampled log-uniformly
    (params.yaml's tune.k, tune.lam, tune.p, tune.lr)."""

    k: tuple[int, int]
    lam: tuple[float, ...]
    p: tuple[int, int]
    lr: tuple[float, float]

    def __post_init__(self) -> None:
        if not 1 <= self.k[0] <= self.k[1]:
            raise ValueError(f"tune: k range {self.k} must satisfy 1 <= low <= high")
        if not 1 <= self.p[0] <= self.p[1]:
            raise ValueError(f"tune: p range {self.p} must satisfy 1 <= low <= high")
        if not 0 < self.lr[0] < self.lr[1]:
            raise ValueError(f"tune: lr range {self.lr} must satisfy 0 < low < high")
        if not self.lam or min(self.lam) < 0:
            raise ValueError(f"tune: lam choices {self.lam} must be non-empty and >= 0")

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        # Choices as floats: a study reloaded with [0, 1] from YAML must see the same
        # categorical distribution as one created with [0.0, 1.0].
        return {
            "k": trial.suggest_int("k", *self.k),
            "lam": trial.suggest_categorical("lam", [float(v) for v in self.lam]),
            "p": trial.suggest_int("p", *self.p),
            "lr": trial.suggest_float("lr", *self.lr, log=True),
        }


@dataclass(frozen=True, kw_only=True)
class TrialSetup:
    """Everything a trial trains and scores except the sampled hyper-parameters.

    `base` holds the pre-training options that are not tuned (batch size, negatives, ...); its
    k / lam / p / lr / seed are replaced per trial and its `epochs` is the (short) pre-training
    length of a trial. `finetune` is the brief fine-tuning that gives the trial's value. The
    fields without a default come from params.yaml (`ptum.stages.tune.trial_setup`).
    """

    prepared: Path
    tokenized: Path
    max_behaviors: int
    arch: str
    behavior_encoder: str  # "" = the architecture's own
    model_sizes: Mapping[str, int | float]  # word_dim, dim, ...
    base: TrainOptions
    space: SearchSpace
    finetune: CellOptions
    demo_select: str  # acc | macro_f1
    multi_objective: bool
    device: str
    demo_labels: tuple[str, ...] = ()  # () = every label column of the data
    ratio: float = 1.0  # label ratio of the fine-tuning (a prepare.label_ratios entry)
    prune_head_epochs: int = 5  # epochs of the frozen-vector head behind the pruning metric
    work_dir: Path | None = None  # parent of the per-trial checkpoint dirs (None = system tmp)


Direction = Literal["minimize", "maximize"]


def directions(s: TrialSetup) -> list[Direction]:
    """Optuna directions of the study's objectives (all maximised)."""
    return ["maximize", "maximize"] if s.multi_objective else ["maximize"]


def objective_names(s: TrialSetup) -> list[str]:
    """demo_valid_METRIC (+ ctr_valid_auc in multi-objective mode)."""
    demo = f"demo_valid_{s.demo_select}"
    return [demo, "ctr_valid_auc"] if s.multi_objective else [demo]


# The range of each metric an objective can be (ptum.finetune.metrics): accuracy and macro-F1
# are shares of users, ROC AUC a probability. A stored value outside it is damage.
METRIC_RANGES: dict[str, tuple[float, float]] = {
    "acc": (0.0, 1.0),
    "macro_f1": (0.0, 1.0),
    "auc": (0.0, 1.0),
}


def objective_range(name: str) -> tuple[float, float]:
    """[low, high] of objective `name` (`objective_names`: demo_valid_acc, ctr_valid_auc...);
    an objective of no known metric is only required to be finite."""
    for metric, bounds in METRIC_RANGES.items():
        if name.endswith(f"_valid_{metric}"):
            return bounds
    return (-math.inf, math.inf)
