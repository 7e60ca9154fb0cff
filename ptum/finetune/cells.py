"""The values the fine-tuning grid is made of: a cell (one run of one method on one split),
which cells a grid holds (`GridAxes`), how a repeat re-draws its split (`SplitSpec`) and what
every cell of a grid shares (`GridOptions`). Shared by the grid, its cache and the stages."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ptum.finetune.options import MODES, CellOptions


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
    """How a repeat re-draws its split (prepare's shares: prepare.demo_split and
    prepare.ctr_valid_frac)."""

    demo_fractions: tuple[float, float, float]
    ctr_valid_frac: float


@dataclass(frozen=True)
class GridAxes:
    """Which cells the grid of one task holds: label x method x mode x ratio x repeat."""

    task: str  # demo | ctr
    labels: tuple[str, ...] | None  # None: every label the prepared data allows
    models: tuple[str, ...]  # pre-trained architectures (checkpoints under ckpt_root)
    modes: tuple[str, ...]  # of MODES
    ratios: tuple[float, ...]  # label ratios (prepare.label_ratios entries)
    repeats: int  # re-drawn splits, seeds seed .. seed + repeats - 1
    baselines: bool  # the task's baselines too (mode "baseline")

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        bad = sorted(set(self.modes) - set(MODES))
        if bad:
            raise ValueError(f"modes: unknown {bad}; choose from {list(MODES)}")


@dataclass(frozen=True)
class GridOptions:
    """What every cell of a grid shares, and where the grid reads and caches."""

    cell: CellOptions  # how a neural cell trains
    seed: int  # repeat r's split and model seed: seed + r
    demo_select: str  # Demo validation metric (acc | macro_f1): epochs, class weight, baselines
    class_weights: tuple[str, ...]  # Demo losses each neural cell tries; best on validation
    split: SplitSpec
    workers: int  # cell processes (1: in this process)
    executor: str  # where cells run: local | dask (ptum.finetune.executors.EXECUTORS)
    scheduler_address: str  # dask: the scheduler's; "": a LocalCluster of `workers` processes
    prepared: Path
    tokenized: Path
    max_behaviors: int
    ckpt_root: Path  # ckpt_root/ARCH: the pre-trained checkpoint of each architecture
    cache_dir: Path  # one JSON per cell result
    # Only the regime stage sets these two (`ptum.data.pool`): the pre-training pool the
    # checkpoints and the svd_* factors saw (None: every training user of the corpus), and the
    # users whose labels and impressions the tasks keep (None: all).
    pool: tuple[str, ...] | None = None
    labeled: tuple[str, ...] | None = None
