"""Serving heads for export, trained for the tasks the prepared data allows.

The fine-tuning grid measures; it does not keep models. For serving, one user model must feed
every head, so the exported heads are trained in `frozen` mode (the "+PTUM (no finetune)"
setting) on all training labels, selected on validation like every grid cell.

A source without demographic labels or CTR impressions (the original PTUM behavior.tsv, a log of
behaviors only) still exports its user model: each head that cannot be trained is skipped with
one line on stderr saying why (`ptum.data.prepare.available_tasks`), instead of failing on the
empty tables.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ptum import checkpoint
from ptum.data.corpus import read_tokens
from ptum.data.prepare import available_tasks
from ptum.finetune.ctr import run_ctr
from ptum.finetune.data import load_ctr, load_demo
from ptum.finetune.demo import run_demo
from ptum.finetune.options import CellOptions
from ptum.heads import BiasedCtrHead, CtrHead, DemoHead
from ptum.models.id_vocab import item_table_digest
from ptum.models.user_model import UserModel

DemoHeads = dict[str, tuple[DemoHead, list[str]]]
_SKIPPED = {"demo": "demographic heads", "ctr": "CTR head (ctr_head.onnx is the bare dot product)"}


def _demo_heads(
    model: UserModel,
    labels: list[str],
    *,
    prepared: Path,
    tokenized: Path,
    max_behaviors: int,
    opts: CellOptions,
    select: str,
    seed: int,
    bar: tqdm,
) -> DemoHeads:
    """One frozen-mode DemoHead per label column in `labels` (all training labels)."""
    demo: DemoHeads = {}
    task = load_demo(prepared, tokenized, max_behaviors, [1.0])
    for label, (y, classes) in task.labels.items():
        rows = np.flatnonzero(task.subsets[1.0] & (y >= 0))
        if label not in labels or len(rows) == 0 or len(classes) < 2:
            continue
        res = run_demo(
            pretrained=model,
            corpus=task.corpus,
            y=y,
            split=task.split,
            train_rows=rows,
            n_classes=len(classes),
            mode="frozen",
            seed=seed,
            opts=opts,
            select=select,
        )
        head = res.head.eval()
        assert isinstance(head, DemoHead)
        demo[label] = (head, [str(c) for c in classes])
        bar.update(1)
    return demo


def _ctr_head(
    model: UserModel,
    *,
    prepared: Path,
    tokenized: Path,
    max_behaviors: int,
    opts: CellOptions,
    seed: int,
) -> CtrHead | BiasedCtrHead | None:
    """The frozen-mode CTR head (opts.ctr_scoring) on every CTR-train impression (None without
    any)."""
    imps = load_ctr(prepared, tokenized, max_behaviors, [1.0])
    train_idx = np.flatnonzero(imps.subsets[1.0])
    if not len(train_idx):
        return None
    res = run_ctr(
        pretrained=model,
        data=imps.data,
        train_idx=train_idx,
        mode="frozen",
        seed=seed,
        opts=opts,
    )
    head = res.head.eval()
    assert isinstance(head, CtrHead | BiasedCtrHead)
    return head


def serving_heads(
    ckpt: Path,
    *,
    prepared: Path,
    tokenized: Path,
    max_behaviors: int,
    opts: CellOptions,
    demo_select: str,
    seed: int,
) -> tuple[DemoHeads, CtrHead | BiasedCtrHead | None]:
    """Demo heads (one per usable label column) and the CTR head on frozen vectors of `ckpt`,
    for the tasks `available_tasks(prepared)` allows; each one left out is one stderr line.

    opts: the fine-tuning options of every head; its ctr_scoring picks the CTR head, "dot"
    (`CtrHead`) or "bias" (`BiasedCtrHead`, served with its item biases and popularity
    fallback: `ptum.serving.heads`). demo_select: the validation metric that selects a Demo
    head's epoch (acc | macro_f1).
    """
    tasks = available_tasks(prepared)
    for task, why in sorted(tasks["why_not"].items()):
        label = task.partition(":")[2]
        what = f"demographic head {label!r}" if label else _SKIPPED[task]
        print(f"export: no {what}: {why}", file=sys.stderr, flush=True)
    if not tasks["demo"] and not tasks["ctr"]:
        return {}, None
    items = item_table_digest(read_tokens(tokenized))
    model = checkpoint.load(ckpt, item_table_sha256=items).model
    # disable=None: tqdm turns itself off when stderr is not a terminal (logs, dvc repro).
    total = len(tasks["demo"]) + int(tasks["ctr"])
    with _one_thread(), tqdm(total=total, desc="export heads", unit="head", disable=None) as bar:
        demo = (
            _demo_heads(
                model,
                tasks["demo"],
                prepared=prepared,
                tokenized=tokenized,
                max_behaviors=max_behaviors,
                opts=opts,
                select=demo_select,
                seed=seed,
                bar=bar,
            )
            if tasks["demo"]
            else {}
        )
        ctr = (
            _ctr_head(
                model,
                prepared=prepared,
                tokenized=tokenized,
                max_behaviors=max_behaviors,
                opts=opts,
                seed=seed,
            )
            if tasks["ctr"]
            else None
        )
        bar.update(int(tasks["ctr"]))
    return demo, ctr


@contextmanager
def _one_thread() -> Iterator[None]:
    """Train on one torch thread: the float sums of several threads differ with their number,
    and the exported heads must be the same bytes whatever OMP_NUM_THREADS or the machine's
    core count (the export is a DVC output)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
