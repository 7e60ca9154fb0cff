"""Stage `finetune@TASK`: run the grid of one task and write its results JSON (DVC metrics)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from ptum.config import FinetuneConfig
from ptum.finetune.grid import (
    ctr_baselines,
    demo_baselines,
    load_ctr,
    load_demo,
    run_grid,
    summarize,
)
from ptum.finetune.train import MODES, CellOptions


def cell_options(cfg: FinetuneConfig) -> CellOptions:
    return CellOptions(
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        max_epochs=cfg.max_epochs,
        patience=cfg.patience,
        head_hidden=cfg.head_hidden,
        weight_decay=cfg.weight_decay,
        encoder_lr_scale=cfg.encoder_lr_scale,
    )


def run_stage(
    cfg: FinetuneConfig,
    task: str,
    *,
    prepared: Path,
    tokenized: Path,
    max_behaviors: int,
    ckpt_root: Path,
    cache_dir: Path,
    out: Path,
) -> dict:
    bad = sorted(set(cfg.modes) - set(MODES))
    if bad:
        raise ValueError(f"finetune.modes: unknown {bad}; choose from {list(MODES)}")
    models = list(cfg.demo_models if task == "demo" else cfg.ctr_models)
    ratios = list(cfg.ratios)
    cells = run_grid(
        task=task,
        labels=None,
        models=models,
        modes=list(cfg.modes),
        ratios=ratios,
        repeats=cfg.repeats,
        seed=cfg.seed,
        opts=cell_options(cfg),
        demo_select=cfg.demo_select,
        prepared=prepared,
        tokenized=tokenized,
        max_len=max_behaviors,
        ckpt_root=ckpt_root,
        cache_dir=cache_dir,
        workers=cfg.workers,
    )
    if task == "demo":
        metrics, primary = ["acc", "macro_f1"], "acc"
        baselines = demo_baselines(load_demo(prepared, tokenized, max_behaviors, ratios), ratios)
    else:
        metrics, primary = ["auc", "ap"], "auc"
        baselines = ctr_baselines(load_ctr(prepared, tokenized, max_behaviors, ratios), ratios)
    summary = summarize(cells, metrics, primary)
    result = {
        "task": task,
        "options": asdict(cell_options(cfg)),
        "repeats": cfg.repeats,
        "summary": summary["cells"],
        "tests": summary["tests"],
        "baselines": baselines,
        "runs": cells,
    }
    _write_json(out, result)
    # A flat, small metrics file: `dvc metrics show` lists every cell (mean/std over seeds).
    flat: dict[str, dict] = {}
    for c in summary["cells"]:
        name = f"{c['label']}/{c['model']}/{c['mode']}/{round(c['ratio'] * 100)}"
        flat[name] = {k: round(v, 5) for k, v in c.items() if k.endswith(("_mean", "_std"))}
    for t in summary["tests"]:
        name = f"{t['label']}/{t['model']}/{t['comparison'].split()[0]}_vs_scratch/{round(t['ratio'] * 100)}"
        flat[name] = {
            "mean_diff": round(t["mean_diff"], 5),
            "p_ttest": t["p_ttest"],
            "p_wilcoxon": t["p_wilcoxon"],
        }
    _write_json(out.with_name(out.stem + "_metrics.json"), flat)
    return {"summary": summary["cells"], "tests": summary["tests"]}


def _write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
