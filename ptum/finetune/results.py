"""The results of one task's fine-tuning grid: run it, then write its summary, every test
prediction and a few headline numbers.

Outputs (TASK = demo | ctr; the finetune stage writes them under reports/finetune):
    reports/finetune/TASK.json              summary (cells, tests, claims, baselines) + runs
    reports/finetune/TASK_predictions.parquet  every test prediction of every run
    reports/finetune/TASK_metrics.json      a few headline numbers (DVC metrics)
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

from ptum.data.prepare.tasks import why_unavailable
from ptum.finetune.cells import GridAxes, GridOptions
from ptum.finetune.data import load_ctr, load_demo
from ptum.finetune.grid import run_grid
from ptum.finetune.summary import METRICS, predictions_frame, summarize
from ptum.io import atomic_path, atomic_write_json


def run_task(axes: GridAxes, options: GridOptions, *, bootstrap: int, out: Path) -> dict:
    """Run the grid of `axes.task` (demo | ctr) and write `out` (TASK.json), its predictions and
    metrics files beside it; returns the summary (cells, tests, claims, versus_baselines).
    `bootstrap`: replicates of each cell's 95% CI."""
    task = axes.task
    why = why_unavailable(task, options.prepared)
    if why is not None:
        return write_unavailable(task, why, out, options.cache_dir)
    runs = run_grid(axes, options)
    user_ids, n_classes = test_users(axes, options)
    preds = predictions_frame(task, runs, user_ids)
    summary = summarize(task, runs, preds, n_classes=n_classes, n_boot=bootstrap, seed=options.seed)
    pred_path = out.with_name(out.stem + "_predictions.parquet")
    pred_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(pred_path) as tmp:
        preds.write_parquet(tmp)
    _write_json(out, _result(axes, options, bootstrap, summary, runs))
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


def test_users(axes: GridAxes, options: GridOptions) -> tuple[list[str], dict[str, int]]:
    """(user id of each row the cells' predictions index, classes per Demo label ({} for CTR))."""
    data = (options.prepared, options.tokenized, options.max_behaviors, list(axes.ratios))
    if axes.task == "demo":
        demo = load_demo(*data)
        n_classes = {label: len(classes) for label, (_, classes) in demo.labels.items()}
        return demo.corpus.user_ids, n_classes
    return load_ctr(*data).users.tolist(), {}


def _result(
    axes: GridAxes, options: GridOptions, bootstrap: int, summary: dict, runs: list[dict]
) -> dict:
    """TASK.json: the grid's set-up, its summary and every run without its predictions."""
    return {
        "task": axes.task,
        "options": asdict(options.cell),
        "class_weights": list(options.class_weights),
        "split": asdict(options.split),
        "repeats": axes.repeats,
        "bootstrap": bootstrap,
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
