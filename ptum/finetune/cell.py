"""One cell of the grid, run: its repeat's split, then the baseline or neural method it names.

A process that runs cells holds a `Worker` (loaded once by `ptum.finetune.grid`): the task's
data, every pre-trained model and the latent factors of the unlabeled corpus, plus the splits
of the repeats it has seen. `run_cell` takes
that worker, the cell and the grid's shared options. This module's import closure is the code
part of a cell's cache key (`grid._code_digest`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

from ptum.finetune.baselines import run_ctr_baseline, run_demo_baseline, tfidf_lr_logits
from ptum.finetune.cells import Cell, GridOptions, SplitSpec
from ptum.finetune.data import CtrTask, DemoTask
from ptum.finetune.factors import Factors
from ptum.finetune.options import CellOptions
from ptum.finetune.train import run_ctr, run_demo
from ptum.models.user_model import UserModel


@dataclass
class Worker:
    """A cell process's state: the task's data, the pre-trained models, the factors of the
    unlabeled corpus, the repeats' splits."""

    task: DemoTask | CtrTask
    models: dict[str, UserModel]
    factors: Factors | None  # the unlabeled corpus's latent factors (the svd_* baselines)
    splits: dict[int, DemoTask | CtrTask] = field(default_factory=dict)

    def split(self, seed: int, spec: SplitSpec) -> DemoTask | CtrTask:
        """The task re-drawn for the repeat with this seed (drawn once per process)."""
        if seed not in self.splits:
            if isinstance(self.task, DemoTask):
                self.splits[seed] = self.task.resplit(seed, spec.demo_fractions)
            else:
                self.splits[seed] = self.task.resplit(seed, spec.ctr_valid_frac)
        return self.splits[seed]


def run_cell(worker: Worker, cell: Cell, grid: GridOptions) -> dict:
    """The cell's result: its fields, its validation-selected test metrics and predictions
    ("pred"), and its run time."""
    t0 = time.perf_counter()
    task = worker.split(cell.seed, grid.split)
    if cell.mode == "baseline":
        res = _baseline(cell, task, grid.demo_select, worker.factors)
    elif isinstance(task, DemoTask):
        res = _neural_demo(cell, task, worker.models[cell.model], grid)
    else:
        res = _neural_ctr(cell, task, worker.models[cell.model], grid.cell)
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


def _neural_demo(cell: Cell, task: DemoTask, model: UserModel, grid: GridOptions) -> dict:
    """One run per entry of grid.class_weights; the best on validation (ties: the first)."""
    y, classes = task.labels[cell.label]
    train_rows = (task.subsets[cell.ratio] & (y >= 0)).nonzero()[0]
    select = grid.demo_select
    wide = (
        tfidf_lr_logits(task, cell.label, cell.ratio, select=select, seed=cell.seed)
        if grid.cell.demo_wide
        else None
    )
    best: dict | None = None
    for weight in grid.class_weights:
        res = run_demo(
            pretrained=model,
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
        ).result
        if best is None or res["valid"][select] > best["valid"][select]:
            best = res | {"chosen": {"class_weight": weight}}
    assert best is not None  # class_weights is never empty
    return best


def _neural_ctr(cell: Cell, task: CtrTask, model: UserModel, opts: CellOptions) -> dict:
    return run_ctr(
        pretrained=model,
        data=task.data,
        train_idx=task.subsets[cell.ratio].nonzero()[0],
        mode=cell.mode,
        seed=cell.seed,
        opts=opts,
    ).result
