"""Validation-only check of the Demo head's training rule at one label ratio.

    python benchmarks/demo_head_check.py [--ratio 0.2] [--repeats 3] [--arch hsa]

Reads the root pipeline's outputs (data/prepared, data/tokenized, models/pretrain/ARCH). For
each repeat (the grid's re-drawn split for seed 100 + r) the validation users are halved at
random: half A does everything validation does in the grid (the LR's C and weighting, early
stopping, the class-weight choice), half B only scores. Test users are not read. Prints, per
label, mode and variant, the mean half-B accuracy and macro-F1, the `tfidf_lr` baseline's
half-B accuracy and the share of half-B predictions equal to the baseline's:

    wide_e8     the default: wide input (finetune.demo_wide), patience 8 epochs
    nowide_e8   no wide input, patience 8 epochs
    wide_s200   wide input, patience of about 200 optimizer steps (finetune mode only)

A held-out half B is needed because a validation score that also selected the model is biased
upward, more so for a rule that offers more candidates (docs/design.md, Fine-tuning).
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ptum import checkpoint
from ptum.config import load_params
from ptum.finetune.baselines import tfidf_lr_logits
from ptum.finetune.data import load_demo
from ptum.finetune.demo import run_demo
from ptum.finetune.metrics import accuracy
from ptum.stages.finetune import cell_options

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--arch", default="hsa")
    args = ap.parse_args()
    torch.set_num_threads(1)
    params = load_params(ROOT / "params.yaml")
    ft, prep = params.finetune, params.prepare
    task0 = load_demo(
        ROOT / "data/prepared",
        ROOT / "data/tokenized",
        prep.max_behaviors,
        list(prep.label_ratios),
    )
    model = checkpoint.load(ROOT / "models/pretrain" / args.arch).model
    base = replace(cell_options(ft), demo_wide=True)
    rows: dict[tuple, list[dict]] = defaultdict(list)
    for r in range(args.repeats):
        seed = ft.seed + r
        task = task0.resplit(seed, tuple(prep.demo_split))
        split = task.split.copy()
        split[split == "test"] = "unused"
        valid = np.flatnonzero(split == "valid")
        half_b = np.random.default_rng(seed + 7).permutation(valid)[: len(valid) // 2]
        split[half_b] = "test"  # run_demo scores "test" rows once, after selection on "valid"
        task = replace(task, split=split)
        for label, (y, classes) in task.labels.items():
            train_rows = (task.subsets[args.ratio] & (y >= 0)).nonzero()[0]
            wide = tfidf_lr_logits(task, label, args.ratio, select=ft.demo_select, seed=seed)
            b_rows = np.flatnonzero((split == "test") & (y >= 0))
            lr_pred = wide[b_rows].argmax(1)
            patience = max(ft.patience, math.ceil(200 / math.ceil(len(train_rows) / ft.batch_size)))
            for mode in ("scratch", "finetune"):
                variants = [("wide_e8", base, wide), ("nowide_e8", base, None)]
                if mode == "finetune":
                    long = replace(base, patience=patience, max_epochs=max(40, 3 * patience))
                    variants.append(("wide_s200", long, wide))
                for name, opts, w in variants:
                    best = None
                    for weight in ft.class_weights:
                        res = run_demo(
                            pretrained=model,
                            corpus=task.corpus,
                            y=y,
                            split=split,
                            train_rows=train_rows,
                            n_classes=len(classes),
                            mode=mode,
                            seed=seed,
                            opts=replace(opts, class_weight=weight),
                            select=ft.demo_select,
                            wide=w,
                        ).result
                        if (
                            best is None
                            or res["valid"][ft.demo_select] > best["valid"][ft.demo_select]
                        ):
                            best = res
                    assert best is not None
                    pred = np.array(best["pred"]["pred"])
                    rows[(label, mode, name)].append(
                        {
                            "acc": best["test"]["acc"],
                            "f1": best["test"]["macro_f1"],
                            "lr": accuracy(y[b_rows], lr_pred),
                            "same": float((pred == lr_pred).mean()),
                        }
                    )
                    print(label, mode, name, seed, rows[(label, mode, name)][-1], flush=True)
    print(f"\nhalf B of validation, {args.arch}, ratio {args.ratio}, {args.repeats} repeats")
    print("label   mode      variant    acc    macro-F1  tfidf_lr acc  same as tfidf_lr")
    for (label, mode, name), v in sorted(rows.items()):
        m = {k: 100 * statistics.mean(x[k] for x in v) for k in ("acc", "f1", "lr", "same")}
        print(
            f"{label:7} {mode:9} {name:10} {m['acc']:5.1f}  {m['f1']:5.1f}     "
            f"{m['lr']:5.1f}         {m['same']:5.0f}%"
        )


if __name__ == "__main__":
    main()
