"""Stage `finetune@TASK`: the fine-tuning grid of one task, demo or ctr (reports/finetune)."""

from __future__ import annotations

from pathlib import Path

from ptum import paths
from ptum.config import Params
from ptum.finetune.cells import SplitSpec
from ptum.finetune.stage import run_stage
from ptum.stages.errors import reading


def split_spec(p: Params) -> SplitSpec:
    """How each repeat of a fine-tuning grid re-draws its split: prepare's shares."""
    return SplitSpec(demo_fractions=p.prepare.demo_split, ctr_valid_frac=p.prepare.ctr_valid_frac)


def run(
    p: Params,
    *,
    task: str = "demo",
    prepared: Path = paths.PREPARED,
    out: Path | None = None,
) -> dict:
    """Run (or finish from the cell cache) the grid of `task`; return its headline metrics."""
    cache = paths.finetune_cache(task)
    with reading(prepared, paths.TOKENIZED, paths.PRETRAIN_MODELS, cache):
        return run_stage(
            p.finetune,
            task,
            prepared=prepared,
            tokenized=paths.TOKENIZED,
            max_behaviors=p.prepare.max_behaviors,
            ckpt_root=paths.PRETRAIN_MODELS,
            split=split_spec(p),
            cache_dir=cache,
            out=out or paths.finetune_result(task),
        )
