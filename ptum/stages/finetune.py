"""Stage `finetune@TASK`: the fine-tuning grid of one task, demo or ctr (reports/finetune).

The one place the `finetune:` section becomes the grid's options (`grid_options`, shared with
the sensitivity stage) and a neural cell's (`cell_options`, also used by tune and export).
"""

from __future__ import annotations

from pathlib import Path

from ptum import paths
from ptum.config import FinetuneConfig, Params
from ptum.finetune.cells import GridAxes, GridOptions, SplitSpec
from ptum.finetune.options import CellOptions
from ptum.finetune.results import run_task
from ptum.stages.errors import reading


def cell_options(c: FinetuneConfig) -> CellOptions:
    """How every neural cell trains, from the finetune section."""
    return CellOptions(
        lr=c.lr,
        batch_size=c.batch_size,
        max_epochs=c.max_epochs,
        patience=c.patience,
        head_hidden=c.head_hidden,
        weight_decay=c.weight_decay,
        encoder_lr_scale=c.encoder_lr_scale,
        ctr_scoring=c.ctr_scoring,
        bias_lr_scale=c.ctr_bias_lr_scale,
        demo_wide=c.demo_wide,
    )


def split_spec(p: Params) -> SplitSpec:
    """How each repeat of a fine-tuning grid re-draws its split: prepare's shares."""
    return SplitSpec(demo_fractions=p.prepare.demo_split, ctr_valid_frac=p.prepare.ctr_valid_frac)


def grid_options(
    c: FinetuneConfig,
    *,
    split: SplitSpec,
    prepared: Path,
    tokenized: Path,
    max_behaviors: int,
    ckpt_root: Path,
    cache_dir: Path,
) -> GridOptions:
    """What every cell of a grid shares: the finetune section, the split and the inputs."""
    return GridOptions(
        cell=cell_options(c),
        seed=c.seed,
        demo_select=c.demo_select,
        class_weights=tuple(c.class_weights),
        split=split,
        workers=c.workers,
        executor=c.executor,
        scheduler_address=c.scheduler_address,
        prepared=prepared,
        tokenized=tokenized,
        max_behaviors=max_behaviors,
        ckpt_root=ckpt_root,
        cache_dir=cache_dir,
    )


def grid_axes(c: FinetuneConfig, task: str) -> GridAxes:
    """The cells of the finetune stage's grid of `task`: every label, with the baselines."""
    return GridAxes(
        task=task,
        labels=None,
        models=tuple(c.demo_models if task == "demo" else c.ctr_models),
        modes=tuple(c.modes),
        ratios=tuple(c.ratios),
        repeats=c.repeats,
        baselines=True,
    )


def run(
    p: Params,
    *,
    task: str = "demo",
    prepared: Path = paths.PREPARED,
    out: Path | None = None,
) -> dict:
    """Run (or finish from the cell cache) the grid of `task`; return its headline metrics."""
    cache = paths.finetune_cache(task)
    options = grid_options(
        p.finetune,
        split=split_spec(p),
        prepared=prepared,
        tokenized=paths.TOKENIZED,
        max_behaviors=p.prepare.max_behaviors,
        ckpt_root=paths.PRETRAIN_MODELS,
        cache_dir=cache,
    )
    with reading(prepared, paths.TOKENIZED, paths.PRETRAIN_MODELS, cache):
        return run_task(
            grid_axes(p.finetune, task),
            options,
            bootstrap=p.finetune.bootstrap,
            out=out or paths.finetune_result(task),
        )
