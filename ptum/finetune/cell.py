"""One cell of the grid, run: its repeat's split, then the baseline or neural method it names.

A process that runs cells holds a `Worker` (loaded once by `ptum.finetune.grid`): the task's
data, every pre-trained model and the latent factors of the unlabeled corpus, plus what it
has computed for earlier cells and later ones reuse rather than recompute: the splits of the
repeats it has seen, the Demo cells' wide input per (label, ratio, repeat) and the frozen
cells' vectors per model. Each is a pure function of its key, so a cell's result does not
depend on which cells its process ran before. `run_cell` takes that worker, the cell and the
grid's shared options. This module's import closure is the code part of a cell's cache key
(`grid._code_digest`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from torch import Tensor

from ptum.finetune.baselines import run_ctr_baseline, run_demo_baseline, tfidf_lr_logits
from ptum.finetune.cells import Cell, GridOptions, SplitSpec
from ptum.finetune.ctr import ctr_frozen_vectors, run_ctr
from ptum.finetune.data import CtrTask, DemoTask
from ptum.finetune.demo import demo_frozen_vectors, run_demo
from ptum.finetune.factors import Factors
from ptum.finetune.options import CellOptions
from ptum.models.user_model import UserModel


@dataclass
class Worker:
    """A cell process's state: the task's data, the pre-trained models, the factors of the
    unlabeled corpus, and what earlier cells computed that later ones share (the repeats'
    splits, the Demo wide inputs, the frozen vectors)."""

    task: DemoTask | CtrTask
    models: dict[str, UserModel]
    factors: Factors | None  # the unlabeled corpus's latent factors (the svd_* baselines)
    splits: dict[int, DemoTask | CtrTask] = field(default_factory=dict)
    # (label, ratio, seed, select) -> tfidf_lr_logits: the same for every mode and class weight
    wides: dict[tuple[str, float, int, str], np.ndarray] = field(default_factory=dict)
    # model -> frozen mode's vectors (demo.demo_frozen_vectors / ctr.ctr_frozen_vectors):
    # they depend on the model and the task's histories only, which no repeat re-draws.
    frozen: dict[str, Tensor | tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)

    def split(self, seed: int, spec: SplitSpec) -> DemoTask | CtrTask:
        """The task re-drawn for the repeat with this seed (drawn once per process)."""
        if seed not in self.splits:
            if isinstance(self.task, DemoTask):
                self.splits[seed] = self.task.resplit(seed, spec.demo_fractions)
            else:
                self.splits[seed] = self.task.resplit(seed, spec.ctr_valid_frac)
        return self.splits[seed]

    def wide(self, task: DemoTask, label: str, ratio: float, seed: int, select: str) -> np.ndarray:
        """The Demo wide input (baselines.tfidf_lr_logits) on `task`, the split of `seed`;
        computed once per process for every mode and class weight of that split. Callers
        must not write into it."""
        key = (label, ratio, seed, select)
        if key not in self.wides:
            self.wides[key] = tfidf_lr_logits(task, label, ratio, select=select, seed=seed)
        return self.wides[key]

    def frozen_vectors(self, model: str) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        """Frozen mode's vectors under pre-trained `model` (every split shares the task's
        histories, so one computation per process serves every frozen cell of the model)."""
        if model not in self.frozen:
            if isinstance(self.task, DemoTask):
                self.frozen[model] = demo_frozen_vectors(self.models[model], self.task.corpus)
            else:
                self.frozen[model] = ctr_frozen_vectors(self.models[model], self.task.data)
        return self.frozen[model]


def run_cell(worker: Worker, cell: Cell, grid: GridOptions) -> dict:
    """The cell's result: its fields, its validation-selected test metrics and predictions
    ("pred"), and its run time."""
    t0 = time.perf_counter()
    task = worker.split(cell.seed, grid.split)
    if cell.mode == "baseline":
        res = _baseline(cell, task, grid.demo_select, worker.factors)
    elif isinstance(task, DemoTask):
        res = _neural_demo(cell, task, worker, grid)
    else:
        res = _neural_ctr(cell, task, worker, grid.cell)
    return {**asdict(cell), **res, "seconds": round(time.perf_counter() - t0, 2)}


def _baseline(
    cell: Cell, task: DemoTask | CtrTask, demo_select: str, factors: Factors | None
) -> dict:
    if isinstance(task, DemoTask):
        return run_demo_baseline(
            cell.model,
            task,
            cell.label,
            cell.ratio,
            select=demo_select,
            seed=cell.seed,
            factors=factors,
        )
    return run_ctr_baseline(cell.model, task, cell.ratio, seed=cell.seed, factors=factors)


def _neural_demo(cell: Cell, task: DemoTask, worker: Worker, grid: GridOptions) -> dict:
    """One run per entry of grid.class_weights; the best on validation (ties: the first)."""
    y, classes = task.labels[cell.label]
    train_rows = (task.subsets[cell.ratio] & (y >= 0)).nonzero()[0]
    select = grid.demo_select
    wide = (
        worker.wide(task, cell.label, cell.ratio, cell.seed, select)
        if grid.cell.demo_wide
        else None
    )
    vectors = worker.frozen_vectors(cell.model) if cell.mode == "frozen" else None
    assert vectors is None or isinstance(vectors, Tensor)  # a Demo worker's
    best: dict | None = None
    for weight in grid.class_weights:
        res = run_demo(
            pretrained=worker.models[cell.model],
            corpus=task.corpus,
            y=y,
            split=task.split,
            train_rows=train_rows,
            n_classes=len(classes),
            mode=cell.mode,
            seed=cell.seed,
            opts=replace(grid.cell, class_weight=weight),
            select=select,
            wide=wide,
            frozen_vectors=vectors,
        ).result
        if best is None or res["valid"][select] > best["valid"][select]:
            best = res | {"chosen": {"class_weight": weight}}
    assert best is not None  # class_weights is never empty
    return best


def _neural_ctr(cell: Cell, task: CtrTask, worker: Worker, opts: CellOptions) -> dict:
    vectors = worker.frozen_vectors(cell.model) if cell.mode == "frozen" else None
    assert vectors is None or isinstance(vectors, tuple)  # a CTR worker's
    return run_ctr(
        pretrained=worker.models[cell.model],
        data=task.data,
        train_idx=task.subsets[cell.ratio].nonzero()[0],
        mode=cell.mode,
        seed=cell.seed,
        opts=opts,
        frozen_vectors=vectors,
    ).result
