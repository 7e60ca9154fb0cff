"""The values the fine-tuning grid is made of: a cell (one run of one method on one split) and
how a repeat re-draws its split. Shared by the grid, its cache and the stages."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Cell:
    task: str  # demo | ctr
    label: str  # demo label column; "click" for ctr
    model: str  # architecture or baseline name
    mode: str  # scratch | frozen | finetune | baseline
    ratio: float
    seed: int  # base seed + repeat: the repeat's split and model seed

    @property
    def name(self) -> str:
        return f"{self.task}/{self.label}/{self.model}/{self.mode}/{round(self.ratio * 100)}/{self.seed}"


@dataclass(frozen=True)
class SplitSpec:
    """How a repeat re-draws its split (prepare's shares)."""

    demo_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    ctr_valid_frac: float = 0.1


DEFAULT_SPLIT = SplitSpec()
