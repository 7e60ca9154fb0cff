"""Summaries of a fine-tuning grid from its runs and per-example predictions (torch-free).

`predictions_frame` turns the runs' saved test predictions into one table (one row per test
user or impression per run); `summarize` computes from it, per (label, method, mode, ratio):
mean ± std over repeats, a 95% bootstrap CI over test users (ptum.finetune.stats), and for CTR
the per-user AUC; then the paired comparisons over repeats and the paper's claims with a
Holm-corrected verdict. The report stage renders this; a test recomputes a cell from the table.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import numpy as np
import polars as pl

from ptum.finetune.metrics import accuracy, average_precision, macro_f1, roc_auc
from ptum.finetune.stats import (
    Predictions,
    bootstrap_ci,
    holm,
    interaction_test,
    paired_test,
    per_user_auc,
)

KEYS = ["label", "model", "mode", "ratio"]
METRICS = {"demo": ["acc", "macro_f1"], "ctr": ["auc", "ap"]}
PRETRAINED = ("frozen", "finetune")


def predictions_frame(task: str, runs: list[dict], user_ids: Sequence[str]) -> pl.DataFrame:
    """One row per test example per run: keys, seed, row, user_id, y and pred (Demo class
    index) or score (CTR logit). `user_ids[row]` is the example's user."""
    out_col = "pred" if task == "demo" else "score"
    frames = []
    ids = np.asarray(user_ids, dtype=object)
    for r in runs:
        p = r["pred"]
        rows = np.asarray(p["row"], dtype=np.int64)
        frames.append(
            pl.DataFrame(
                {
                    "task": task,
                    "label": r["label"],
                    "model": r["model"],
                    "mode": r["mode"],
                    "ratio": float(r["ratio"]),
                    "seed": int(r["seed"]),
                    "row": rows,
                    "user_id": pl.Series(ids[rows].tolist(), dtype=pl.String),
                    "y": np.asarray(p["y"], dtype=np.int64),
                    out_col: np.asarray(
                        p[out_col], dtype=np.int64 if task == "demo" else np.float64
                    ),
                }
            )
        )
    return pl.concat(frames) if frames else pl.DataFrame(schema=prediction_schema(task))


def prediction_schema(task: str) -> dict[str, type[pl.DataType]]:
    """The columns of `predictions_frame` (also those of a task's empty predictions file)."""
    out: dict[str, type[pl.DataType]] = {
        "task": pl.String,
        "label": pl.String,
        "model": pl.String,
        "mode": pl.String,
        "ratio": pl.Float64,
        "seed": pl.Int32,
        "row": pl.Int64,
        "user_id": pl.String,
        "y": pl.Int64,
    }
    out["pred" if task == "demo" else "score"] = pl.Int64 if task == "demo" else pl.Float64
    return out


def cell_metric(task: str, metric: str, y: np.ndarray, out: np.ndarray, n_classes: int) -> float:
    """One run's test metric from its predictions (what the runs report as test metrics)."""
    if metric == "acc":
        return accuracy(y, out)
    if metric == "macro_f1":
        return macro_f1(y, out, n_classes)
    if metric == "auc":
        return roc_auc(y, out)
    if metric == "ap":
        return average_precision(y, out)
    raise ValueError(f"unknown metric {metric!r}")


def _nan(x: float) -> float | None:
    return None if x is None or np.isnan(x) else float(x)


def summarize(
    task: str,
    runs: list[dict],
    preds: pl.DataFrame,
    *,
    n_classes: dict[str, int] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Cells (mean, std, CI, per-user AUC), paired tests and claims of one task's grid."""
    metrics = METRICS[task]
    out_col = "pred" if task == "demo" else "score"
    n_classes = n_classes or {}
    per_run = pl.DataFrame(
        [{**{k: r[k] for k in KEYS + ["seed"]}, **{m: r["test"][m] for m in metrics}} for r in runs]
    )
    cells = []
    for key, g in per_run.group_by(KEYS, maintain_order=True):
        row = dict(zip(KEYS, key))
        row["n"] = g.height
        sub = preds.filter(
            (pl.col("label") == row["label"])
            & (pl.col("model") == row["model"])
            & (pl.col("mode") == row["mode"])
            & (pl.col("ratio") == row["ratio"])
        )
        reps = [
            Predictions(s["y"].to_numpy(), s[out_col].to_numpy(), s["user_id"].to_numpy())
            for _, s in sub.group_by("seed", maintain_order=True)
        ]
        for m in metrics:
            # Polars types a column's mean and std as any Python value; these are floats.
            row[f"{m}_mean"] = _nan(float(cast(float, g[m].mean())))
            row[f"{m}_std"] = _nan(float(cast(float, g[m].std()))) if g.height > 1 else 0.0
            lo, hi = bootstrap_ci(
                reps, m, n_classes=n_classes.get(row["label"], 0), n_boot=n_boot, seed=seed
            )
            row[f"{m}_ci_lo"], row[f"{m}_ci_hi"] = _nan(lo), _nan(hi)
        if task == "ctr":
            u = [per_user_auc(p.y, p.out, p.user) for p in reps]
            row["user_auc_mean"] = _nan(float(np.nanmean(u))) if u else None
            row["user_auc_std"] = _nan(float(np.nanstd(u, ddof=1))) if len(u) > 1 else 0.0
        cells.append(row)
    tests = paired_tests(per_run, metrics)
    return {
        "cells": cells,
        "tests": tests,
        "claims": claims(per_run, metrics),
        "versus_baselines": versus_baselines(per_run, cells, metrics),
    }


def _series(per_run: pl.DataFrame, label: str, model: str, mode: str, ratio: float, m: str):
    g = per_run.filter(
        (pl.col("label") == label)
        & (pl.col("model") == model)
        & (pl.col("mode") == mode)
        & (pl.col("ratio") == ratio)
    ).sort("seed")
    return g["seed"].to_list(), g[m].to_numpy()


def _paired(per_run, label, a: tuple[str, str], b: tuple[str, str], ratio, m) -> dict | None:
    """Paired test of method a vs b over the repeats both ran."""
    sa, va = _series(per_run, label, *a, ratio, m)
    sb, vb = _series(per_run, label, *b, ratio, m)
    common = sorted(set(sa) & set(sb))
    if len(common) < 2:
        return None
    ia, ib = [sa.index(s) for s in common], [sb.index(s) for s in common]
    return paired_test(va[ia], vb[ib])


def paired_tests(per_run: pl.DataFrame, metrics: list[str]) -> list[dict]:
    """frozen / finetune vs scratch, per (label, model, ratio) and metric, paired by repeat."""
    out = []
    neural = per_run.filter(pl.col("mode") != "baseline")
    for (label, model, ratio), _ in neural.group_by(
        ["label", "model", "ratio"], maintain_order=True
    ):
        for mode in PRETRAINED:
            for m in metrics:
                t = _paired(per_run, label, (model, mode), (model, "scratch"), ratio, m)
                if t is not None:
                    out.append(
                        {
                            "label": label,
                            "model": model,
                            "ratio": ratio,
                            "metric": m,
                            "comparison": f"{mode} - scratch",
                            **t,
                        }
                    )
    return out


def claims(per_run: pl.DataFrame, metrics: list[str]) -> list[dict]:
    """The paper's claims per (label, model), each a paired test over repeats, Holm-corrected
    over every claim test of the task on the same metric:

    C1  finetune beats scratch at the lowest label ratio;
    C2  the gain (finetune - scratch) is larger at the lowest ratio than at the highest
        (difference in differences per repeat);
    C3  finetune beats frozen (no finetune) at the lowest label ratio.
    """
    neural = per_run.filter(pl.col("mode") != "baseline")
    if neural.height == 0:
        return []
    ratios = sorted(set(neural["ratio"].to_list()))
    lo, hi = ratios[0], ratios[-1]
    out = []
    for m in metrics:
        family = []
        for (label, model), _ in neural.group_by(["label", "model"], maintain_order=True):
            t1 = _paired(per_run, label, (model, "finetune"), (model, "scratch"), lo, m)
            if t1:
                family.append({"claim": "C1", "ratio": lo, **t1, "label": label, "model": model})
            if hi != lo:
                s = {
                    (mode, r): dict(zip(*_series(per_run, label, model, mode, r, m)))
                    for mode in ("finetune", "scratch")
                    for r in (lo, hi)
                }
                common = sorted(set.intersection(*(set(v) for v in s.values())))
                if len(common) >= 2:
                    t2 = interaction_test(
                        *(
                            np.array([s[k][c] for c in common])
                            for k in (
                                ("finetune", lo),
                                ("scratch", lo),
                                ("finetune", hi),
                                ("scratch", hi),
                            )
                        )
                    )
                    family.append(
                        {
                            "claim": "C2",
                            "ratio": f"{lo:g} vs {hi:g}",
                            **t2,
                            "label": label,
                            "model": model,
                        }
                    )
            t3 = _paired(per_run, label, (model, "finetune"), (model, "frozen"), lo, m)
            if t3:
                family.append({"claim": "C3", "ratio": lo, **t3, "label": label, "model": model})
        adjusted = holm([f["p_ttest"] for f in family])
        for f, p in zip(family, adjusted):
            f["metric"] = m
            f["p_holm"] = _nan(p)
            f["holds"] = bool(f["mean_diff"] > 0 and p is not None and not np.isnan(p) and p < 0.05)
            out.append(f)
    return out


def versus_baselines(per_run: pl.DataFrame, cells: list[dict], metrics: list[str]) -> list[dict]:
    """Per (label, ratio, metric): the strongest baseline and the best pre-trained cell (by mean
    over repeats), and a paired test of the best pre-trained cell against that baseline.
    `above_baseline` like a claim's `holds`: mean difference > 0 and paired t p < 0.05 after
    Holm's correction over the task's comparisons on the same metric. (Not being below the
    baseline by the means is no verdict: on labels independent of behaviors it happens in
    about half the comparisons; docs/data.md, "Controls for the statistics".)"""
    out = []
    groups = {(c["label"], c["ratio"]) for c in cells}
    for label, ratio in sorted(groups):
        here = [c for c in cells if c["label"] == label and c["ratio"] == ratio]
        for m in metrics:
            key = f"{m}_mean"

            def best(cs: list[dict], key: str = key) -> dict | None:
                cs = [c for c in cs if c[key] is not None]
                return max(cs, key=lambda c: c[key]) if cs else None

            base = best([c for c in here if c["mode"] == "baseline"])
            pre = best([c for c in here if c["mode"] in PRETRAINED])
            scratch = best([c for c in here if c["mode"] == "scratch"])
            if base is None or pre is None:
                continue
            t = _paired(
                per_run, label, (pre["model"], pre["mode"]), (base["model"], "baseline"), ratio, m
            )
            out.append(
                {
                    "label": label,
                    "ratio": ratio,
                    "metric": m,
                    "baseline": base["model"],
                    "baseline_mean": base[key],
                    "baseline_ci": [base[f"{m}_ci_lo"], base[f"{m}_ci_hi"]],
                    "pretrained": f"{pre['model']}/{pre['mode']}",
                    "pretrained_mean": pre[key],
                    "scratch": scratch and scratch["model"],
                    "scratch_mean": scratch and scratch[key],
                    # A tie (equal up to float rounding of the mean) is not a loss.
                    "pretrained_below_baseline": pre[key] < base[key] - 1e-9,
                    "within_baseline_ci": base[f"{m}_ci_lo"] is not None
                    and pre[key] >= base[f"{m}_ci_lo"],
                    **({"p_ttest": t["p_ttest"], "mean_diff": t["mean_diff"]} if t else {}),
                }
            )
    for m in metrics:
        family = [v for v in out if v["metric"] == m]
        adjusted = holm([v.get("p_ttest", float("nan")) for v in family])
        for v, p in zip(family, adjusted):
            v["p_holm"] = _nan(p)
            v["above_baseline"] = bool(v.get("mean_diff", 0.0) > 0 and not np.isnan(p) and p < 0.05)
    return out
