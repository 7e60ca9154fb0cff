"""The fine-tuning grid of one task: cells in parallel processes (ptum.finetune.executors), cached.

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

import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

from ptum import checkpoint
from ptum.codedeps import module_closure, source_digest
from ptum.data.corpus import file_digest, tokenizer_digest
from ptum.data.pool import users_digest
from ptum.data.prepare.tasks import available_tasks
from ptum.finetune.baselines import CTR_BASELINES, DEMO_BASELINES
from ptum.finetune.cache import CellKeys, from_cache, write_entry
from ptum.finetune.cells import Cell, GridAxes, GridOptions
from ptum.finetune.executors import run_cells
from ptum.finetune.workers import WorkerSpec
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
        for cell, res in run_cells(todo, _worker_spec(axes, options), options):
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
        pool=None if options.pool is None else users_digest(options.pool),
        labeled=None if options.labeled is None else users_digest(options.labeled),
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


def _worker_spec(axes: GridAxes, options: GridOptions) -> WorkerSpec:
    """What each cell process loads: one torch thread per process when several run cells
    (a local pool, every Dask worker), all the cores when the cells run in this process
    (`_own_threads`)."""
    alone = options.executor == "local" and options.workers <= 1
    return WorkerSpec(
        task=axes.task,
        prepared=options.prepared.absolute(),
        tokenized=options.tokenized.absolute(),
        max_behaviors=options.max_behaviors,
        ratios=tuple(axes.ratios),
        ckpt_dirs={m: (options.ckpt_root / m).absolute() for m in axes.models},
        threads=_own_threads() if alone else 1,
        factors=axes.baselines,
        pool=options.pool,
        labeled=options.labeled,
    )


def _own_threads() -> int:
    """Torch threads for cells run in this process: every core, or OMP_NUM_THREADS where it
    is set to a number. On a machine that other jobs share, two threads that wait on each
    other made a cell ten times slower than one thread (results are the same either way)."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) >= 1 else (os.cpu_count() or 1)


def _progress_bar(total: int, cached: int, desc: str) -> tqdm | LogLines:
    """tqdm over the grid's cells (with ETA) on a terminal; in a log (CI, `dvc repro`) a line
    at most once a minute (done/total, elapsed, ETA) between run_grid's first and last line."""
    return progress(total=total, initial=cached, unit="cell", desc=desc, leave=False)
