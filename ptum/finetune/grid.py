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
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm import tqdm

from ptum import checkpoint
from ptum.codedeps import module_closure, source_digest
from ptum.data.corpus import file_digest, read_tokens, tokenizer_digest
from ptum.data.prepare.tasks import available_tasks
from ptum.finetune.baselines import (
    CTR_BASELINES,
    DEMO_BASELINES,
    run_ctr_baseline,
    run_demo_baseline,
    tfidf_lr_logits,
)
from ptum.finetune.cache import CellKeys, from_cache, write_entry
from ptum.finetune.cells import DEFAULT_SPLIT, Cell, SplitSpec
from ptum.finetune.data import CtrTask, DemoTask, load_ctr, load_demo
from ptum.finetune.train import CellOptions, run_ctr, run_demo
from ptum.models.id_vocab import item_table_digest


def _code_digest() -> str:
    """Hash of the code a cell's result depends on (the import closure of the cell runners:
    training, baselines, task data and splits, heads, models), so a code change never reuses
    old cells; comments, docstrings, formatting and type annotations do not count (see
    codedeps.source_digest)."""
    return source_digest(
        module_closure("ptum.finetune.train", "ptum.finetune.baselines", "ptum.finetune.data")
    )


# ---------------------------------------------------------------- workers

_STATE: dict = {}


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


def _init_worker(
    task: str,
    prepared: str,
    tokenized: str,
    max_len: int,
    ratios: list[float],
    ckpt_dirs: dict[str, str],
    threads: int,
) -> None:
    torch.set_num_threads(threads)
    loader = load_demo if task == "demo" else load_ctr
    _STATE["task"] = loader(Path(prepared), Path(tokenized), max_len, ratios)
    # A hybrid checkpoint's item ids must index this token matrix (refused otherwise).
    items = item_table_digest(read_tokens(Path(tokenized)))
    _STATE["models"] = {
        m: checkpoint.load(Path(d), item_table_sha256=items).model for m, d in ckpt_dirs.items()
    }
    _STATE["splits"] = {}


def _pool_worker(*init: object) -> None:
    _die_with_parent()
    _init_worker(*init)  # type: ignore[arg-type]


def _split(seed: int, spec: SplitSpec) -> DemoTask | CtrTask:
    """The loaded task re-drawn for the repeat with this seed (memoised per process)."""
    if seed not in _STATE["splits"]:
        task = _STATE["task"]
        if isinstance(task, DemoTask):
            _STATE["splits"][seed] = task.resplit(seed, spec.demo_fractions)
        else:
            _STATE["splits"][seed] = task.resplit(seed, spec.ctr_valid_frac)
    return _STATE["splits"][seed]


def _run_cell(
    cell: Cell, opts: CellOptions, demo_select: str, class_weights: tuple[str, ...], spec: SplitSpec
) -> dict:
    t0 = time.perf_counter()
    task = _split(cell.seed, spec)
    if cell.mode == "baseline":
        if isinstance(task, DemoTask):  # cell.task == "demo"
            res = run_demo_baseline(
                cell.model, task, cell.label, cell.ratio, select=demo_select, seed=cell.seed
            )
        else:
            res = run_ctr_baseline(cell.model, task, cell.ratio, seed=cell.seed)
    elif isinstance(task, DemoTask):
        y, classes = task.labels[cell.label]
        train_rows = (task.subsets[cell.ratio] & (y >= 0)).nonzero()[0]
        wide = (
            tfidf_lr_logits(task, cell.label, cell.ratio, select=demo_select, seed=cell.seed)
            if opts.demo_wide
            else None
        )
        runs = []
        for weight in class_weights:
            r = run_demo(
                pretrained=_STATE["models"][cell.model],
                corpus=task.corpus,
                y=y,
                split=task.split,
                train_rows=train_rows,
                n_classes=len(classes),
                mode=cell.mode,
                seed=cell.seed,
                opts=replace(opts, class_weight=weight),
                select=demo_select,
                wide=wide,
            )
            runs.append((r["valid"][demo_select], weight, r))
        # First best on validation wins (ties keep the earlier entry of class_weights).
        best = max(range(len(runs)), key=lambda i: (runs[i][0], -i))
        res = runs[best][2] | {"chosen": {"class_weight": runs[best][1]}}
    else:
        res = run_ctr(
            pretrained=_STATE["models"][cell.model],
            data=task.data,
            train_idx=task.subsets[cell.ratio].nonzero()[0],
            mode=cell.mode,
            seed=cell.seed,
            opts=opts,
        )
    return {**asdict(cell), **res, "seconds": round(time.perf_counter() - t0, 2)}


def _progress_bar(total: int, cached: int, desc: str) -> tqdm:
    """tqdm over the grid's cells (with ETA) on a terminal; off a terminal (CI, `dvc repro`
    logs) only a line at the start and one at the end (see _run_cells)."""
    # disable=None: tqdm turns itself off when stderr is not a terminal.
    return tqdm(total=total, initial=cached, unit="cell", desc=desc, disable=None, leave=False)


def grid_cells(
    *,
    task: str,
    labels: list[str],
    models: list[str],
    modes: list[str],
    ratios: list[float],
    repeats: int,
    seed: int,
    baselines: bool = True,
) -> list[Cell]:
    """Every cell of the grid: baselines first (fast), then the neural cells."""
    names = (DEMO_BASELINES if task == "demo" else CTR_BASELINES) if baselines else ()
    base = [
        Cell(task, lab, b, "baseline", r, seed + k)
        for lab in labels
        for b in names
        for r in ratios
        for k in range(repeats)
    ]
    neural = [
        Cell(task, lab, m, mode, r, seed + k)
        for lab in labels
        for m in models
        for mode in modes
        for r in ratios
        for k in range(repeats)
    ]
    return base + neural


def run_grid(
    *,
    task: str,
    labels: list[str] | None,
    models: list[str],
    modes: list[str],
    ratios: list[float],
    repeats: int,
    seed: int,
    opts: CellOptions,
    demo_select: str,
    prepared: Path,
    tokenized: Path,
    max_len: int,
    ckpt_root: Path,
    cache_dir: Path,
    workers: int,
    class_weights: tuple[str, ...] = ("none",),
    split: SplitSpec = DEFAULT_SPLIT,
    baselines: bool = True,
) -> list[dict]:
    """Run (or fetch from cache) every cell of one task; returns the cell results (with their
    test predictions under "pred")."""
    if repeats < 1:
        raise ValueError(f"finetune.repeats must be >= 1, got {repeats}")
    if labels is None:
        labels = _task_labels(task, prepared)
    ckpts = {m: ckpt_root / m for m in models}
    keys = CellKeys(
        opts=opts,
        demo_select=demo_select,
        class_weights=tuple(class_weights),
        split=split,
        model_hashes=_checkpoint_hashes(ckpts, tokenized),
        data_hash=_data_digest(prepared, tokenized),
        code_hash=_code_digest(),
    )
    cells = grid_cells(
        task=task,
        labels=labels,
        models=models,
        modes=modes,
        ratios=ratios,
        repeats=repeats,
        seed=seed,
        baselines=baselines,
    )
    results, todo = from_cache(cells, cache_dir, keys)
    init = _worker_init(task, prepared, tokenized, max_len, ratios, ckpts, workers)
    args = (opts, demo_select, tuple(class_weights), split)

    def store(c: Cell, res: dict) -> None:
        write_entry(cache_dir / f"{keys.key(c)}.json", keys.key(c), res)
        results[c.name] = res

    _run_cells(f"{task} grid", len(cells), len(results), todo, workers, init, args, store)
    return [results[c.name] for c in cells]


def _worker_init(
    task: str,
    prepared: Path,
    tokenized: Path,
    max_len: int,
    ratios: list[float],
    ckpts: dict[str, Path],
    workers: int,
) -> tuple:
    """The arguments of `_init_worker` (picklable, for a spawned pool's initializer): one torch
    thread per worker process, all the cores when the cells run in this process."""
    return (
        task,
        str(prepared),
        str(tokenized),
        max_len,
        ratios,
        {m: str(d) for m, d in ckpts.items()},
        1 if workers > 1 else (os.cpu_count() or 1),
    )


def _task_labels(task: str, prepared: Path) -> list[str]:
    """The task's labels: Demo's label columns that the prepared data allows (a column with one
    class among the training users, or no test user, is left out), ["click"] for CTR."""
    return list(available_tasks(prepared)["demo"]) if task == "demo" else ["click"]


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


def _run_cells(
    desc: str,
    total: int,
    cached: int,
    todo: list[Cell],
    workers: int,
    init: tuple,
    args: tuple,
    store: Callable[[Cell, dict], None],
) -> None:
    """Run the cells of `todo` (those of the grid's `total` not `cached`) in `workers`
    spawned processes (or in this one), passing each result to `store` as it comes, with
    progress on stderr. `init` sets up a worker (`_init_worker`), `args` follow the cell in
    `_run_cell`."""
    t0 = time.perf_counter()
    print(f"{desc}: {total} cells, {cached} cached", file=sys.stderr, flush=True)
    bar = _progress_bar(total, cached, desc)
    if todo and workers > 1:
        # spawn, not fork: a fork after torch has run (e.g. pre-training in this process) can
        # deadlock the child on OpenMP's thread pool.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            max_workers=workers, initializer=_pool_worker, initargs=init, mp_context=ctx
        ) as pool:
            futures = {pool.submit(_run_cell, c, *args): c for c in todo}
            for future in as_completed(futures):
                store(futures[future], future.result())
                bar.update()
    elif todo:
        _init_worker(*init)
        for c in todo:
            store(c, _run_cell(c, *args))
            bar.update()
    bar.close()
    seconds = time.perf_counter() - t0
    print(f"{desc}: {len(todo)} cells run in {seconds:.0f}s", file=sys.stderr, flush=True)
