"""The fine-tuning grid of one task: cells in parallel processes, cached.

A cell = (task, label, method, mode, ratio, seed). A method is a pre-trained architecture
(modes scratch / frozen / finetune) or a baseline (mode "baseline", see ptum.finetune.baselines).
Repeat r of the grid has seed = base seed + r: it re-draws the split (DemoTask.resplit /
CtrTask.resplit) and seeds the models, and every method of the repeat sees that same split.

A neural Demo cell trains once per entry of `class_weights` and keeps the run with the best
validation score (the same selection budget in every mode). Every cell's result holds its
validation-selected test metrics and its per-example test predictions. Results are cached under
`cache_dir`, keyed by everything they depend on (cell, options, checkpoint, data, code), so a
rerun only computes cells whose inputs changed.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ptum import checkpoint
from ptum.codedeps import module_closure, source_digest
from ptum.data.corpus import file_digest, load_corpus, read_tokens, tokenizer_digest
from ptum.data.prepare.tasks import available_tasks
from ptum.finetune.baselines import CTR_BASELINES, DEMO_BASELINES
from ptum.finetune.cache import CellKeys, from_cache, write_entry
from ptum.finetune.cell import Worker, run_cell
from ptum.finetune.cells import Cell, GridAxes, GridOptions
from ptum.finetune.data import load_ctr, load_demo
from ptum.finetune.factors import fit_factors
from ptum.models.id_vocab import item_table_digest
from ptum.progress import LogLines, progress


def run_grid(axes: GridAxes, options: GridOptions) -> list[dict]:
    """Run (or fetch from cache) every cell of `axes`; returns the cell results in grid order
    (with their test predictions under "pred")."""
    labels = axes.labels if axes.labels is not None else task_labels(axes.task, options.prepared)
    cells = grid_cells(axes, labels, options.seed)
    keys = _cell_keys(axes, options)
    results, todo = from_cache(cells, options.cache_dir, keys)

    def store(c: Cell, res: dict) -> None:
        write_entry(options.cache_dir / f"{keys.key(c)}.json", keys.key(c), res)
        results[c.name] = res

    print(
        f"{axes.task} grid: {len(cells)} cells, {len(results)} cached", file=sys.stderr, flush=True
    )
    t0 = time.perf_counter()
    with _progress_bar(len(cells), len(results), f"{axes.task} grid") as bar:
        for cell, res in _run_cells(todo, _worker_spec(axes, options), options):
            store(cell, res)
            bar.update()
    seconds = time.perf_counter() - t0
    print(f"{axes.task} grid: {len(todo)} cells run in {seconds:.0f}s", file=sys.stderr, flush=True)
    return [results[c.name] for c in cells]


def grid_cells(axes: GridAxes, labels: tuple[str, ...] | list[str], seed: int) -> list[Cell]:
    """Every cell of the grid: baselines first (fast), then the neural cells."""
    names = (DEMO_BASELINES if axes.task == "demo" else CTR_BASELINES) if axes.baselines else ()
    repeats = range(axes.repeats)
    base = [
        Cell(axes.task, lab, b, "baseline", r, seed + k)
        for lab in labels
        for b in names
        for r in axes.ratios
        for k in repeats
    ]
    neural = [
        Cell(axes.task, lab, m, mode, r, seed + k)
        for lab in labels
        for m in axes.models
        for mode in axes.modes
        for r in axes.ratios
        for k in repeats
    ]
    return base + neural


def task_labels(task: str, prepared: Path) -> list[str]:
    """The task's labels: Demo's label columns that the prepared data allows (a column with one
    class among the training users, or no test user, is left out), ["click"] for CTR."""
    return list(available_tasks(prepared)["demo"]) if task == "demo" else ["click"]


# ---------------------------------------------------------------- cache keys


def _code_digest() -> str:
    """Hash of the code a cell's result depends on (the import closure of the cell runner:
    training, baselines, task data and splits, heads, models), so a code change never reuses
    old cells; comments, docstrings, formatting and type annotations do not count (see
    codedeps.source_digest)."""
    return source_digest(module_closure("ptum.finetune.cell"))


def _cell_keys(axes: GridAxes, options: GridOptions) -> CellKeys:
    ckpts = {m: options.ckpt_root / m for m in axes.models}
    return CellKeys(
        opts=options.cell,
        demo_select=options.demo_select,
        class_weights=tuple(options.class_weights),
        split=options.split,
        model_hashes=_checkpoint_hashes(ckpts, options.tokenized),
        data_hash=_data_digest(options.prepared, options.tokenized),
        code_hash=_code_digest(),
    )


def _checkpoint_hashes(ckpts: dict[str, Path], tokenized: Path) -> dict[str, str]:
    """The weights hash of each architecture's checkpoint, refusing one pre-trained with
    another tokenizer or holding another architecture."""
    tok_hash = tokenizer_digest(tokenized)
    hashes = {}
    for m, d in ckpts.items():
        meta = checkpoint.read_meta(d)
        if meta.get("tokenizer_sha256") != tok_hash:
            raise checkpoint.CheckpointMismatch(
                f"{d}: pre-trained with another tokenizer than {tokenized}; re-run pretrain"
            )
        if meta.get("architecture") != m:
            raise checkpoint.CheckpointMismatch(f"{d}: holds {meta.get('architecture')}, not {m}")
        hashes[m] = meta["model_sha256"]
    return hashes


def _data_digest(prepared: Path, tokenized: Path) -> str:
    """Hash of the data files a cell reads."""
    return file_digest(
        [prepared / f for f in ("labels.parquet", "impressions.parquet", "sequences.parquet")]
        + [tokenized / "tokens.npy"]
    )


# ---------------------------------------------------------------- running cells


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker loads (picklable: a spawned pool's initializer receives it)."""

    task: str
    prepared: Path
    tokenized: Path
    max_behaviors: int
    ratios: tuple[float, ...]
    ckpt_dirs: dict[str, Path]  # architecture -> checkpoint directory
    threads: int  # torch threads of the process
    factors: bool  # fit the unlabeled corpus's factors (the grid runs the svd_* baselines)


def load_worker(spec: WorkerSpec) -> Worker:
    """Read the task's data and the checkpoints, fit the unlabeled corpus's factors when the
    grid has baselines; sets this process's torch threads."""
    torch.set_num_threads(spec.threads)
    loader = load_demo if spec.task == "demo" else load_ctr
    task = loader(spec.prepared, spec.tokenized, spec.max_behaviors, list(spec.ratios))
    # A hybrid checkpoint's item ids must index this token matrix (refused otherwise).
    items = item_table_digest(read_tokens(spec.tokenized))
    models = {
        m: checkpoint.load(d, item_table_sha256=items).model for m, d in spec.ckpt_dirs.items()
    }
    # The unlabeled users are pre-training's: the train split of the pre-training corpus.
    unlabeled = (
        load_corpus(spec.prepared, spec.tokenized, "train", spec.max_behaviors)
        if spec.factors
        else None
    )
    return Worker(task, models, fit_factors(unlabeled) if unlabeled is not None else None)


def _worker_spec(axes: GridAxes, options: GridOptions) -> WorkerSpec:
    """What each cell process loads: one torch thread per worker process, all the cores when
    the cells run in this process."""
    return WorkerSpec(
        task=axes.task,
        prepared=options.prepared,
        tokenized=options.tokenized,
        max_behaviors=options.max_behaviors,
        ratios=tuple(axes.ratios),
        ckpt_dirs={m: options.ckpt_root / m for m in axes.models},
        threads=1 if options.workers > 1 else (os.cpu_count() or 1),
        factors=axes.baselines,
    )


def _run_cells(
    todo: list[Cell], spec: WorkerSpec, options: GridOptions
) -> Iterator[tuple[Cell, dict]]:
    """(cell, result) for every cell of `todo` as it finishes: in `options.workers` spawned
    processes, or in this one."""
    if not todo:
        return
    if options.workers <= 1:
        worker = load_worker(spec)
        for c in todo:
            yield c, run_cell(worker, c, options)
        return
    # spawn, not fork: a fork after torch has run (e.g. pre-training in this process) can
    # deadlock the child on OpenMP's thread pool.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=options.workers, initializer=_pool_init, initargs=(spec,), mp_context=ctx
    ) as pool:
        futures = {pool.submit(_pool_cell, c, options): c for c in todo}
        for future in as_completed(futures):
            yield futures[future], future.result()


# A pool process's Worker. ProcessPoolExecutor runs the initializer once per process but hands
# its return value to no task, and the Worker (the task's data and every model) is too large to
# send with each cell: so the initializer parks it here, and `_pool_cell` passes it on to
# run_cell explicitly. Only pool processes set it; the parent never reads it.
_POOL_WORKER: Worker | None = None


def _pool_init(spec: WorkerSpec) -> None:
    global _POOL_WORKER
    _die_with_parent()
    _POOL_WORKER = load_worker(spec)


def _pool_cell(cell: Cell, options: GridOptions) -> dict:
    assert _POOL_WORKER is not None, "called outside a pool process started by _run_cells"
    return run_cell(_POOL_WORKER, cell, options)


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (a killed `ptum finetune` or
    `dvc repro` must not leave pool workers running); a no-op elsewhere."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


def _progress_bar(total: int, cached: int, desc: str) -> tqdm | LogLines:
    """tqdm over the grid's cells (with ETA) on a terminal; in a log (CI, `dvc repro`) a line
    at most once a minute (done/total, elapsed, ETA) between run_grid's first and last line."""
    return progress(total=total, initial=cached, unit="cell", desc=desc, leave=False)
