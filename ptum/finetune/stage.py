"""Stage `finetune@TASK`: run the grid of one task; write its results, predictions and metrics.

Outputs (TASK = demo | ctr):
    reports/finetune/TASK.json              summary (cells, tests, claims, baselines) + runs
    reports/finetune/TASK_predictions.parquet  every test prediction of every run
    reports/finetune/TASK_metrics.json      a few headline numbers (DVC metrics)
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

from ptum.config import FinetuneConfig
from ptum.data.prepare.tasks import why_unavailable
from ptum.finetune.cells import SplitSpec
from ptum.finetune.data import load_ctr, load_demo
from ptum.finetune.grid import run_grid
from ptum.finetune.summary import METRICS, predictions_frame, summarize
from ptum.finetune.train import MODES, CellOptions
from ptum.io import atomic_path, atomic_write_json


def cell_options(cfg: FinetuneConfig) -> CellOptions:
    """The options of every neural cell, from the finetune section."""
    return CellOptions(
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        max_epochs=cfg.max_epochs,
        patience=cfg.patience,
        head_hidden=cfg.head_hidden,
        weight_decay=cfg.weight_decay,
        encoder_lr_scale=cfg.encoder_lr_scale,
        ctr_scoring=cfg.ctr_scoring,
        bias_lr_scale=cfg.ctr_bias_lr_scale,
        demo_wide=cfg.demo_wide,
    )


def config_grid(
    cfg: FinetuneConfig,
    task: str,
    *,
    models: list[str],
    modes: list[str],
    ratios: list[float],
    repeats: int,
    prepared: Path,
    tokenized: Path,
    max_behaviors: int,
    split: SplitSpec,
    ckpt_root: Path,
    cache_dir: Path,
    baselines: bool = True,
) -> list[dict]:
    """`run_grid` over the given models/modes/ratios/repeats with everything else (cell
    options, seed, selection metric, class weights, workers) from the finetune section: the one
    place the finetune and sensitivity stages turn that section into a grid."""
    return run_grid(
        task=task,
        labels=None,
        models=models,
        modes=modes,
        ratios=ratios,
        repeats=repeats,
        seed=cfg.seed,
        opts=cell_options(cfg),
        demo_select=cfg.demo_select,
        prepared=prepared,
        tokenized=tokenized,
        max_len=max_behaviors,
        ckpt_root=ckpt_root,
        cache_dir=cache_dir,
        workers=cfg.workers,
        class_weights=cfg.class_weights,
        split=split,
        baselines=baselines,
    )


def run_stage(
    cfg: FinetuneConfig,
    task: str,
    *,
    prepared: Path,
    tokenized: Path,
    max_behaviors: int,
    split: SplitSpec,
    ckpt_root: Path,
    cache_dir: Path,
    out: Path,
) -> dict:
    """Run the grid of `task` (demo | ctr) and write `out` (TASK.json), its predictions and
    metrics files beside it; returns the summary (cells, tests, claims, versus_baselines)."""
    bad = sorted(set(cfg.modes) - set(MODES))
    if bad:
        raise ValueError(f"finetune.modes: unknown {bad}; choose from {list(MODES)}")
    why = why_unavailable(task, prepared)
    if why is not None:
        return write_unavailable(task, why, out, cache_dir)
    ratios = list(cfg.ratios)
    runs = config_grid(
        cfg,
        task,
        models=list(cfg.demo_models if task == "demo" else cfg.ctr_models),
        modes=list(cfg.modes),
        ratios=ratios,
        repeats=cfg.repeats,
        prepared=prepared,
        tokenized=tokenized,
        max_behaviors=max_behaviors,
        split=split,
        ckpt_root=ckpt_root,
        cache_dir=cache_dir,
    )
    user_ids, n_classes = _test_users(task, prepared, tokenized, max_behaviors, ratios)
    preds = predictions_frame(task, runs, user_ids)
    summary = summarize(task, runs, preds, n_classes=n_classes, n_boot=cfg.bootstrap, seed=cfg.seed)
    pred_path = out.with_name(out.stem + "_predictions.parquet")
    pred_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(pred_path) as tmp:
        preds.write_parquet(tmp)
    _write_json(out, _result(cfg, task, split, summary, runs))
    _write_json(out.with_name(out.stem + "_metrics.json"), headline(task, summary))
    return summary


def write_unavailable(task: str, why: str, out: Path, cache_dir: Path) -> dict:
    """The outputs of a task the prepared data does not allow (a normal outcome, e.g. the PTUM
    behavior.tsv layout has no labels and no impressions): TASK.json and the metrics file say
    so and why, the predictions file has its columns and no rows, the cell cache is empty."""
    print(f"{task} grid: not run: {task} is not available ({why})", file=sys.stderr)
    cache_dir.mkdir(parents=True, exist_ok=True)
    pred_path = out.with_name(out.stem + "_predictions.parquet")
    pred_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(pred_path) as tmp:
        predictions_frame(task, [], []).write_parquet(tmp)
    result = {"task": task, "available": False, "why_not": why}
    _write_json(
        out,
        {**result, **{k: [] for k in ("summary", "tests", "claims", "versus_baselines", "runs")}},
    )
    _write_json(out.with_name(out.stem + "_metrics.json"), result)
    return result


def _test_users(
    task: str, prepared: Path, tokenized: Path, max_behaviors: int, ratios: list[float]
) -> tuple[list[str], dict[str, int]]:
    """(user id of each row the cells' predictions index, classes per Demo label ({} for CTR))."""
    if task == "demo":
        data = load_demo(prepared, tokenized, max_behaviors, ratios)
        n_classes = {label: len(classes) for label, (_, classes) in data.labels.items()}
        return data.corpus.user_ids, n_classes
    return load_ctr(prepared, tokenized, max_behaviors, ratios).users.tolist(), {}


def _result(
    cfg: FinetuneConfig, task: str, split: SplitSpec, summary: dict, runs: list[dict]
) -> dict:
    """TASK.json: the grid's set-up, its summary and every run without its predictions."""
    return {
        "task": task,
        "options": asdict(cell_options(cfg)),
        "class_weights": list(cfg.class_weights),
        "split": asdict(split),
        "repeats": cfg.repeats,
        "bootstrap": cfg.bootstrap,
        "summary": summary["cells"],
        "tests": summary["tests"],
        "claims": summary["claims"],
        "versus_baselines": summary["versus_baselines"],
        "runs": [{k: v for k, v in r.items() if k != "pred"} for r in runs],
    }


def headline(task: str, summary: dict) -> dict:
    """A dozen numbers for `dvc metrics show`: per label and ratio, the primary metric of the
    strongest baseline and of the best pre-trained cell; and how many claims hold."""
    primary = METRICS[task][-1] if task == "demo" else METRICS[task][0]
    out: dict[str, dict] = {}
    for v in summary["versus_baselines"]:
        if v["metric"] != primary:
            continue
        name = f"{v['label']}/{round(v['ratio'] * 100)}"
        out[name] = {
            "baseline": round(v["baseline_mean"], 4),
            "pretrained": round(v["pretrained_mean"], 4),
        }
    held = [c for c in summary["claims"] if c["metric"] == primary]
    out["claims"] = {
        c: sum(x["holds"] for x in held if x["claim"] == c) for c in ("C1", "C2", "C3")
    }
    out["claims"]["tested"] = len(held)
    return out


def _write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, obj, indent=1, sort_keys=True, allow_nan=True)
