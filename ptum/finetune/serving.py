"""Serving heads for export: trained on the frozen pre-trained user vectors.

The fine-tuning grid measures; it does not keep models. For serving, one user model must feed
every head, so the exported heads are trained in `frozen` mode (the "+PTUM (no finetune)"
setting) on all training labels, selected on validation like every grid cell.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from ptum import checkpoint
from ptum.config import FinetuneConfig
from ptum.finetune.grid import load_ctr, load_demo
from ptum.finetune.stage import cell_options
from ptum.finetune.train import run_ctr, run_demo
from ptum.heads import CtrHead, DemoHead
from ptum.pretrain.data import read_tokens
from ptum.pretrain.id_vocab import item_table_digest


def train_serving_heads(
    ckpt: Path,
    *,
    prepared: Path,
    tokenized: Path,
    max_behaviors: int,
    cfg: FinetuneConfig,
    seed: int,
) -> tuple[dict[str, tuple[DemoHead, list[str]]], CtrHead | None]:
    """Demo heads (one per label column) and the CTR head on frozen vectors of `ckpt`."""
    items = item_table_digest(read_tokens(tokenized))
    model = checkpoint.load(ckpt, item_table_sha256=items).model
    # The exported CTR head is the paper's dot product (ctr_head.onnx takes user and candidate
    # vectors only); the "bias" head needs item ids and popularity that serving does not have.
    opts = replace(cell_options(cfg), ctr_scoring="dot")
    demo: dict[str, tuple[DemoHead, list[str]]] = {}
    task = load_demo(prepared, tokenized, max_behaviors, [1.0])
    for label, (y, classes) in task.labels.items():
        rows = np.flatnonzero(task.subsets[1.0] & (y >= 0))
        if len(rows) == 0 or len(classes) < 2:
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
            select=cfg.demo_select,
            return_models=True,
        )
        demo[label] = (res["head"].eval(), [str(c) for c in classes])
    ctr = None
    imps = load_ctr(prepared, tokenized, max_behaviors, [1.0])
    train_idx = np.flatnonzero(imps.subsets[1.0])
    if len(train_idx):
        res = run_ctr(
            pretrained=model,
            data=imps.data,
            train_idx=train_idx,
            mode="frozen",
            seed=seed,
            opts=opts,
            return_models=True,
        )
        ctr = res["head"].eval()
    return demo, ctr
