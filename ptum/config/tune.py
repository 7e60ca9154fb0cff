"""The `tune` section (stage `tune`, ptum.tune) and the range of each of its keys.

Every key is checked when params load, so a bad value ends the run before a study is opened
with one line naming the key, instead of a trial's traceback (epochs: -1) or a run that does
nothing and says "done" (n_trials: -1).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from ptum.config.errors import require, require_seed
from ptum.config.names import ARCHITECTURE_NAMES, PRUNER_NAMES

# tune.storage: one SQLite file (local workers), or PostgreSQL through psycopg2 (several
# machines; ptum.tune.database). Nothing else: a URL of another database would fail only when a
# worker first opens it, with a driver's traceback.
_STORAGE = re.compile(r"sqlite:///(?!:memory:).+|postgresql(\+psycopg2)?://.*", re.DOTALL)
_STUDY_NAME_MAX = 512  # Optuna's RDB column for study names


@dataclass(frozen=True)
class TuneConfig:
    """Section of stage `tune`: Optuna search over K, λ, P and the pre-training lr (ptum.tune)."""

    # User model each trial pre-trains (a key of ptum.models.ARCHITECTURES; paper Demo: hsa).
    arch: str = "hsa"
    # Complete + pruned trials the study must hold; a rerun adds only the missing ones.
    n_trials: int = 4
    # Local worker processes on the same storage (`ptum tune --workers N` overrides).
    workers: int = 1
    # Sampler seed; trial i pre-trains and fine-tunes with seed + i (numpy), the sampler takes
    # seed + starts + 7919 * worker: below errors.SEED_LIMIT leaves room for those offsets.
    seed: int = 0
    # Pre-training epochs of a trial (the pruner looks after each) and the epochs of the brief
    # fine-tuning (Demo, label ratio 1.0) whose validation metric is the trial's value.
    epochs: int = 2
    finetune_epochs: int = 3
    # Search space: inclusive ranges for K and P, the λ choices, a log-uniform lr range.
    k: tuple[int, int] = (1, 5)
    lam: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
    p: tuple[int, int] = (1, 16)
    lr: tuple[float, float] = (1e-4, 1e-2)
    pruner: Literal["median", "hyperband", "none"] = "median"
    prune_startup_trials: int = 2
    # Maximise (Demo validation metric, CTR validation AUC) and report the Pareto front; Optuna
    # does not prune multi-objective studies.
    multi_objective: bool = False
    # Study storage, sqlite:///PATH or postgresql://USER@HOST/DB (workers on several machines;
    # docs/tuning.md#postgresql), and study name; "" =
    # ptum-ARCH-<hash of data, model, options, search space, seed>, so changing what a trial
    # measures starts a new study instead of mixing incomparable trials.
    storage: str = "sqlite:///data/tune/optuna.db"
    study_name: str = ""
    # A RUNNING trial without a heartbeat for grace_period seconds (its process died) is marked
    # FAIL when the study next starts a trial, and its parameters are retried retry_killed times.
    heartbeat_interval: int = 60
    grace_period: int = 180
    retry_killed: int = 1

    def __post_init__(self) -> None:
        require(
            self.arch in ARCHITECTURE_NAMES,
            "tune.arch",
            self.arch,
            f"one of {' | '.join(ARCHITECTURE_NAMES)}",
        )
        for name in ("n_trials", "workers", "epochs", "finetune_epochs", "heartbeat_interval"):
            v = getattr(self, name)
            require(v >= 1, f"tune.{name}", v, "an integer >= 1")
        require_seed(self.seed, "tune.seed")
        require(
            self.prune_startup_trials >= 0,
            "tune.prune_startup_trials",
            self.prune_startup_trials,
            "an integer >= 0",
        )
        require(self.retry_killed >= 0, "tune.retry_killed", self.retry_killed, "an integer >= 0")
        # Optuna fails a live trial whose last heartbeat is older than the grace period.
        require(
            self.grace_period > self.heartbeat_interval,
            "tune.grace_period",
            self.grace_period,
            f"> tune.heartbeat_interval ({self.heartbeat_interval}): a live trial beats only "
            "that often and would be marked FAIL in between",
        )
        require(self.pruner in PRUNER_NAMES, "tune.pruner", self.pruner, " | ".join(PRUNER_NAMES))
        self._check_space()
        self._check_study()

    def _check_space(self) -> None:
        """The search space, as ptum.tune.SearchSpace samples it."""
        for name in ("k", "p"):
            low, high = getattr(self, name)
            require(
                1 <= low <= high,
                f"tune.{name}",
                (low, high),
                "an inclusive range [low, high] with 1 <= low <= high",
            )
        require(
            len(self.lam) >= 1
            and all(math.isfinite(v) and v >= 0 for v in self.lam)
            and len(set(self.lam)) == len(self.lam),
            "tune.lam",
            self.lam,
            "a non-empty list of distinct finite choices >= 0",
        )
        low, high = self.lr
        require(
            math.isfinite(high) and 0 < low < high,
            "tune.lr",
            self.lr,
            "a finite log-uniform range [low, high] with 0 < low < high",
        )

    def _check_study(self) -> None:
        """Where the study is stored and its name."""
        scheme = self.storage.partition("://")[0]
        hint = (
            "; write postgresql:// (SQLAlchemy refuses postgres://)" if scheme == "postgres" else ""
        )
        require(
            _STORAGE.fullmatch(self.storage) is not None and ":memory:" not in self.storage,
            "tune.storage",
            _masked(self.storage),
            "sqlite:///PATH (one file, for workers on this machine) or "
            "postgresql://USER@HOST[:PORT]/DB (also postgresql+psycopg2://; workers on several "
            f"machines); not in memory: the study must outlive the run{hint}",
        )
        require(
            self.study_name == self.study_name.strip() and len(self.study_name) <= _STUDY_NAME_MAX,
            "tune.study_name",
            self.study_name,
            f'"" (a name derived from the set-up) or a name of at most {_STUDY_NAME_MAX} '
            "characters without leading or trailing spaces",
        )


def _masked(url: str) -> str:
    """The URL with the password of `scheme://user:password@` masked, for a message."""
    return re.sub(r"^([^:/]*://[^:/@?]*:)[^@/?]*@", r"\1***@", url)
