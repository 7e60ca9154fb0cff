"""What a process that runs grid cells loads once: the task's data, the checkpoints and the
unlabeled corpus's factors (a `Worker`, see ptum.finetune.cell), described by a `WorkerSpec`
small enough to send to a spawned process or a Dask worker."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ptum import checkpoint
from ptum.data.corpus import load_corpus, read_tokens
from ptum.finetune.cell import Worker
from ptum.finetune.data import load_ctr, load_demo
from ptum.finetune.factors import fit_factors
from ptum.models.id_vocab import item_table_digest


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker loads (picklable: a spawned pool's initializer and every Dask task
    receive it). Paths are absolute: a Dask worker may run in another directory."""

    task: str
    prepared: Path
    tokenized: Path
    max_behaviors: int
    ratios: tuple[float, ...]
    ckpt_dirs: dict[str, Path]  # architecture -> checkpoint directory
    threads: int  # torch threads of the process
    factors: bool  # fit the unlabeled corpus's factors (the grid runs the svd_* baselines)
    # The regime stage's (GridOptions): the unlabeled users factorized, the pre-training pool
    # (None: every training user), and the users the tasks keep (None: every labeled user).
    pool: tuple[str, ...] | None = None
    labeled: tuple[str, ...] | None = None

    def inputs(self) -> list[Path]:
        """Every file or directory the worker reads."""
        return [self.prepared, self.tokenized, *self.ckpt_dirs.values()]


def load_worker(spec: WorkerSpec) -> Worker:
    """Read the task's data and the checkpoints, fit the unlabeled corpus's factors when the
    grid has baselines; sets this process's torch threads."""
    torch.set_num_threads(spec.threads)
    loader = load_demo if spec.task == "demo" else load_ctr
    labeled = set(spec.labeled) if spec.labeled is not None else None
    task = loader(spec.prepared, spec.tokenized, spec.max_behaviors, list(spec.ratios), labeled)
    # A hybrid checkpoint's item ids must index this token matrix (refused otherwise).
    items = item_table_digest(read_tokens(spec.tokenized))
    models = {
        m: checkpoint.load(d, item_table_sha256=items).model for m, d in spec.ckpt_dirs.items()
    }
    # The unlabeled users are pre-training's: the train split of the pre-training corpus (its
    # pool, when the grid has one).
    users = sorted(spec.pool) if spec.pool is not None else None
    unlabeled = (
        load_corpus(spec.prepared, spec.tokenized, "train", spec.max_behaviors, users=users)
        if spec.factors
        else None
    )
    return Worker(task, models, fit_factors(unlabeled) if unlabeled is not None else None)
