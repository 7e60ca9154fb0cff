"""The sections of the data stages, `ingest`, `prepare` and `tokenize`, with their range checks.

Each field's comment documents the key; the defaults are the root params.yaml's values
(`ptum.config.schema` gathers every section).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ptum.config.errors import ConfigError, require, require_one_of, require_seed
from ptum.config.names import SYNTHETIC_SIZES


@dataclass(frozen=True)
class DataConfig:
    """Section of stage `ingest`: where the behavior log comes from."""

    source: Literal["synthetic", "movielens", "generic", "ptum_tsv"] = "synthetic"
    # Input directory (movielens, generic) or file (ptum_tsv). Relative paths are resolved from
    # the project root. Empty for synthetic; for movielens, empty means "download from GroupLens".
    path: str = ""
    # Synthetic size preset (see ptum.data.synthetic.PRESETS).
    size: str = "small"
    seed: int = 7
    # MovieLens: an impression is a click when rating >= click_threshold.
    click_threshold: int = 4
    # MovieLens: age bucket edges (years); bucket i holds ages in [edge[i-1], edge[i]).
    age_edges: tuple[int, ...] = (25, 35, 45)
    # MovieLens download variant when path is empty.
    movielens_variant: Literal["ml-100k", "ml-1m"] = "ml-100k"

    def __post_init__(self) -> None:
        require_one_of(self.size, SYNTHETIC_SIZES, "data.size")
        require_seed(self.seed, "data.seed")
        require(
            len(self.age_edges) >= 1 and list(self.age_edges) == sorted(set(self.age_edges)),
            "data.age_edges",
            self.age_edges,
            "a non-empty list of strictly increasing ages",
        )


@dataclass(frozen=True)
class PrepareConfig:
    """Section of stage `prepare`: validation, item table, user sequences, splits."""

    max_behaviors: int = 100
    # error: stop at the first bad row with file:line and reason. quarantine: drop bad rows into
    # data/prepared/quarantine/ and count them per reason in the data report.
    on_bad_rows: Literal["error", "quarantine"] = "error"
    # Exact duplicate events (same user, second and text): drop (and count them in the data
    # report) or error (stop at the first, with file:line).
    on_duplicates: Literal["drop", "error"] = "drop"
    # CTR time windows: global timestamp cut-offs (one for everyone). "per_user" (each user's
    # own last impressions) is refused, with the reason: it puts other users' future in training.
    ctr_windows: Literal["global", "per_user"] = "global"
    # Fractions of impressions (by time rank) in the CTR-train and CTR-test windows; impressions
    # before the CTR-train window are history and are not used as CTR samples.
    ctr_train_frac: float = 0.15
    ctr_test_frac: float = 0.1
    # Share of CTR-train-window impressions held out for validation (paper: 9:1).
    ctr_valid_frac: float = 0.1
    # Labeled users: train / validation / test shares (paper: 80/10/10).
    demo_split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    # Nested training-label subsets (fractions of the training users / impressions), increasing,
    # the last 1.0 (all of them: ptum tune fine-tunes with it); subset r is column train_<100 r>.
    label_ratios: tuple[float, ...] = (0.2, 0.5, 1.0)
    # Share of pre-training users held out to measure MBP/NBP accuracy.
    pretrain_valid_frac: float = 0.05
    seed: int = 13
    # A behaviors table with more rows is processed in chunks of whole users of about this
    # many rows (same outputs; peak memory set by the chunk, not the log).
    chunk_rows: int = 4_000_000

    def __post_init__(self) -> None:
        require(self.max_behaviors >= 2, "prepare.max_behaviors", self.max_behaviors, ">= 2")
        require(
            self.on_bad_rows in ("error", "quarantine"),
            "prepare.on_bad_rows",
            self.on_bad_rows,
            "error or quarantine",
        )
        require(
            self.on_duplicates in ("drop", "error"),
            "prepare.on_duplicates",
            self.on_duplicates,
            "drop or error",
        )
        if self.ctr_windows != "global":
            raise ConfigError(
                f"prepare.ctr_windows={self.ctr_windows!r} is refused: per-user windows put "
                "impressions (and pre-training behaviors) that are later than other users' test "
                "impressions into training, so the test window is no longer the future; set "
                "prepare.ctr_windows: global"
            )
        require(
            abs(sum(self.demo_split) - 1.0) <= 1e-6 and min(self.demo_split) >= 0,
            "prepare.demo_split",
            self.demo_split,
            "3 shares >= 0 summing to 1",
        )
        self._check_label_ratios()
        train, test = self.ctr_train_frac, self.ctr_test_frac
        require(
            0 < train < 1 and 0 < test < 1 and train + test <= 1,
            "prepare.ctr_train_frac, ctr_test_frac",
            (train, test),
            "each in (0, 1), summing to <= 1",
        )
        # Each is a share of a set that must keep members on both sides: fine-tuning selects
        # the epoch on the CTR validation draw, pre-training measures MBP/NBP on held-out users.
        for name in ("ctr_valid_frac", "pretrain_valid_frac"):
            v = getattr(self, name)
            require(0 < v < 1, f"prepare.{name}", v, "a share in (0, 1)")
        require_seed(self.seed, "prepare.seed")
        require(self.chunk_rows >= 1, "prepare.chunk_rows", self.chunk_rows, "an integer >= 1")

    def _check_label_ratios(self) -> None:
        """Nested subsets, each its own column train_<percent>, the largest the full set."""
        ratios = self.label_ratios
        shares = len(ratios) >= 1 and all(0 < r <= 1 for r in ratios)  # also refuses nan
        percents = [round(r * 100) for r in ratios] if shares else []
        require(
            shares
            and percents[0] >= 1
            and all(a < b for a, b in zip(percents, percents[1:]))
            and ratios[-1] == 1.0,
            "prepare.label_ratios",
            ratios,
            "strictly increasing shares in (0, 1], each rounding to its own percent >= 1 (subset "
            "r is column train_<round(100 r)>), the last 1.0 (ptum tune uses all training labels)",
        )


@dataclass(frozen=True)
class TokenizeConfig:
    """Section of stage `tokenize`: SentencePiece over the distinct item texts."""

    model_type: Literal["unigram", "bpe", "char", "word"] = "unigram"
    vocab_size: int = 8000
    byte_fallback: bool = True
    max_tokens: int = 30
    # SentencePiece takes [0.98, 1].
    character_coverage: float = 0.9995
    seed: int = 1

    def __post_init__(self) -> None:
        require(self.vocab_size >= 1, "tokenize.vocab_size", self.vocab_size, "an integer >= 1")
        require(self.max_tokens >= 1, "tokenize.max_tokens", self.max_tokens, "an integer >= 1")
        require(
            0.98 <= self.character_coverage <= 1,
            "tokenize.character_coverage",
            self.character_coverage,
            "in [0.98, 1] (SentencePiece's range)",
        )
        require_seed(self.seed, "tokenize.seed")
