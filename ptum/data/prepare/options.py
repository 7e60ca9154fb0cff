"""`PrepareOptions`: the explicit, checked arguments of stage `prepare` (the CLI builds them from
the `prepare:` section of params.yaml)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PrepareOptions:
    """Explicit arguments of `prepare` (the CLI builds them from params.yaml)."""

    max_behaviors: int = 100
    on_bad_rows: str = "error"
    on_duplicates: str = "drop"
    ctr_windows: str = "global"
    ctr_train_frac: float = 0.1
    ctr_test_frac: float = 0.1
    ctr_valid_frac: float = 0.1
    demo_split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    label_ratios: tuple[float, ...] = (0.2, 0.5, 1.0)
    pretrain_valid_frac: float = 0.05
    seed: int = 13
    chunk_rows: int = 4_000_000

    def __post_init__(self) -> None:
        if self.max_behaviors < 2:
            raise ValueError("prepare.max_behaviors must be >= 2")
        if self.on_bad_rows not in ("error", "quarantine"):
            raise ValueError(
                f"prepare.on_bad_rows must be error or quarantine, got {self.on_bad_rows!r}"
            )
        if self.on_duplicates not in ("drop", "error"):
            raise ValueError(
                f"prepare.on_duplicates must be drop or error, got {self.on_duplicates!r}"
            )
        if self.chunk_rows < 1:
            raise ValueError(f"prepare.chunk_rows must be >= 1, got {self.chunk_rows}")
        if self.ctr_windows != "global":
            raise ValueError(
                f"prepare.ctr_windows={self.ctr_windows!r} is refused: per-user windows put "
                "impressions (and pre-training behaviors) that are later than other users' test "
                "impressions into training, so the test window is no longer the future; set "
                "prepare.ctr_windows: global"
            )
        if abs(sum(self.demo_split) - 1.0) > 1e-6 or min(self.demo_split) < 0:
            raise ValueError(
                f"prepare.demo_split must be 3 shares summing to 1, got {self.demo_split}"
            )
        if not all(0 < r <= 1 for r in self.label_ratios):
            raise ValueError(f"prepare.label_ratios must lie in (0, 1], got {self.label_ratios}")
        if not (
            0 < self.ctr_test_frac < 1
            and 0 < self.ctr_train_frac < 1
            and self.ctr_train_frac + self.ctr_test_frac <= 1
        ):
            raise ValueError(
                "prepare.ctr_train_frac and ctr_test_frac must be in (0, 1) and sum <= 1"
            )
