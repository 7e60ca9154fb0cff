"""Summaries of a fine-tuning grid from its runs and per-example predictions (torch-free).

`predictions_frame` turns the runs' saved test predictions into one table (one row per test
user or impression per run); `summarize` computes from it, per (label, method, mode, ratio):
mean ± std over repeats, a 95% bootstrap CI over test users (ptum.finetune.stats), and for CTR
the per-user AUC; then the paired comparisons over repeats and the paper's claims with a
Holm-corrected verdict. The report stage renders this; a test recomputes a cell from the table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import polars as pl

from ptum.finetune.metrics import accuracy, average_precision, macro_f1, roc_auc
from ptum.finetune.stats import (
    Predictions,
    UserBootstrap,
    both_p,
    fragile,
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


def nan_none(x: float | None) -> float | None:
    """JSON-safe: nan (an undefined metric or p-value) becomes null."""
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
    n_classes = n_classes or {}
    tests = comparisons(task, runs, preds, n_classes=n_classes, n_boot=n_boot, seed=seed)
    per_run, sets, users = tests.per_run, tests.sets, tests.users
    cells = []
    for key, g in per_run.group_by(KEYS, maintain_order=True):
        row = dict(zip(KEYS, key))
        row["n"] = g.height
        reps = [(k, p) for k, p in sets.items() if k[:4] == tuple(key)]
        for m in metrics:
            # Polars types a column's mean and std as any Python value; these are floats.
            row[f"{m}_mean"] = nan_none(float(cast(float, g[m].mean())))
            row[f"{m}_std"] = nan_none(float(cast(float, g[m].std()))) if g.height > 1 else 0.0
            row[f"{m}_valid_mean"] = nan_none(float(cast(float, g[f"valid_{m}"].mean())))
            lo, hi = users.interval(reps, m, n_classes.get(row["label"], 0))
            row[f"{m}_ci_lo"], row[f"{m}_ci_hi"] = nan_none(lo), nan_none(hi)
        if task == "ctr":
            u = [per_user_auc(p.y, p.out, p.user) for _, p in reps]
            row["user_auc_mean"] = nan_none(float(np.nanmean(u))) if u else None
            row["user_auc_std"] = nan_none(float(np.nanstd(u, ddof=1))) if len(u) > 1 else 0.0
        cells.append(row)
    return {
        "cells": cells,
        "tests": paired_tests(tests, metrics),
        "claims": claims(tests, metrics),
        "versus_baselines": versus_baselines(tests, cells, metrics),
    }


@dataclass(frozen=True)
class Comparisons:
    """What the comparisons read: each run's test metrics (`per_run`) and each run's test
    predictions by (label, model, mode, ratio, seed), for the tests over users."""

    per_run: pl.DataFrame
    sets: dict[tuple, Predictions]
    n_classes: dict[str, int]
    users: UserBootstrap

    def series(self, label: str, model: str, mode: str, ratio: float, m: str):
        g = self.per_run.filter(
            (pl.col("label") == label)
            & (pl.col("model") == model)
            & (pl.col("mode") == mode)
            & (pl.col("ratio") == ratio)
        ).sort("seed")
        return g["seed"].to_list(), g[m].to_numpy()

    def over_users(self, label: str, m: str, terms: list[tuple[float, tuple]], seeds) -> dict:
        """UserBootstrap.contrast of sum coef * cell over `seeds`; a cell is (model, mode, ratio)."""
        keyed = [
            (c, [((label, *cell, s), self.sets[(label, *cell, s)]) for s in seeds])
            for c, cell in terms
        ]
        return self.users.contrast(keyed, m, self.n_classes.get(label, 0))

    def paired(self, label, a: tuple[str, str], b: tuple[str, str], ratio, m) -> dict | None:
        """Method a vs b over the repeats both ran: paired over repeats and over test users;
        `p` needs both (stats.both_p)."""
        sa, va = self.series(label, *a, ratio, m)
        sb, vb = self.series(label, *b, ratio, m)
        common = sorted(set(sa) & set(sb))
        if len(common) < 2:
            return None
        ia, ib = [sa.index(s) for s in common], [sb.index(s) for s in common]
        t = paired_test(va[ia], vb[ib])
        u = self.over_users(label, m, [(1.0, (*a, ratio)), (-1.0, (*b, ratio))], common)
        return {**t, **_users(u), "p": both_p(t["p_ttest"], u["p_users"])}


def comparisons(
    task: str,
    runs: list[dict],
    preds: pl.DataFrame,
    *,
    n_classes: dict[str, int],
    n_boot: int,
    seed: int,
) -> Comparisons:
    """The paired tests (over repeats and over test users) of one grid's runs, for callers
    that compare cells of their own choosing (ptum.finetune.regime)."""
    metrics = METRICS[task]
    per_run = pl.DataFrame(
        [
            {
                **{k: r[k] for k in KEYS + ["seed"]},
                **{m: r["test"][m] for m in metrics},
                **{f"valid_{m}": r["valid"][m] for m in metrics},
            }
            for r in runs
        ]
    )
    sets = _prediction_sets(preds, "pred" if task == "demo" else "score")
    users = UserBootstrap(preds["user_id"].unique().to_numpy(), n_boot=n_boot, seed=seed)
    return Comparisons(per_run, sets, n_classes, users)


def _users(u: dict) -> dict:
    return {"se_users": nan_none(u["se_users"]), "p_users": nan_none(u["p_users"])}


def _prediction_sets(preds: pl.DataFrame, out_col: str) -> dict[tuple, Predictions]:
    """(label, model, mode, ratio, seed) -> that run's test Predictions."""
    return {
        key: Predictions(g["y"].to_numpy(), g[out_col].to_numpy(), g["user_id"].to_numpy())
        for key, g in preds.partition_by(KEYS + ["seed"], as_dict=True).items()
    }


def paired_tests(tests: Comparisons, metrics: list[str]) -> list[dict]:
    """frozen / finetune vs scratch, per (label, model, ratio) and metric, paired by repeat."""
    out = []
    neural = tests.per_run.filter(pl.col("mode") != "baseline")
    for (label, model, ratio), _ in neural.group_by(
        ["label", "model", "ratio"], maintain_order=True
    ):
        for mode in PRETRAINED:
            for m in metrics:
                t = tests.paired(label, (model, mode), (model, "scratch"), ratio, m)
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


def claims(tests: Comparisons, metrics: list[str]) -> list[dict]:
    """The paper's claims per (label, model), each paired over repeats and over test users,
    Holm-corrected over every claim test of the task on the same metric:

    C1  finetune beats scratch at the lowest label ratio;
    C2  the gain (finetune - scratch) is larger at the lowest ratio than at the highest
        (difference in differences per repeat);
    C3  finetune beats frozen (no finetune) at the lowest label ratio.
    """
    neural = tests.per_run.filter(pl.col("mode") != "baseline")
    if neural.height == 0:
        return []
    ratios = sorted(set(neural["ratio"].to_list()))
    lo, hi = ratios[0], ratios[-1]
    out = []
    for m in metrics:
        family = []
        for (label, model), _ in neural.group_by(["label", "model"], maintain_order=True):
            t1 = tests.paired(label, (model, "finetune"), (model, "scratch"), lo, m)
            if t1:
                family.append({"claim": "C1", "ratio": lo, **t1, "label": label, "model": model})
            t2 = _interaction(tests, label, model, lo, hi, m) if hi != lo else None
            if t2:
                family.append(
                    {
                        "claim": "C2",
                        "ratio": f"{lo:g} vs {hi:g}",
                        **t2,
                        "label": label,
                        "model": model,
                    }
                )
            t3 = tests.paired(label, (model, "finetune"), (model, "frozen"), lo, m)
            if t3:
                family.append({"claim": "C3", "ratio": lo, **t3, "label": label, "model": model})
        for f in _verdicts(family, "holds"):
            f["metric"] = m
            out.append(f)
    return out


def _interaction(
    tests: Comparisons, label: str, model: str, lo: float, hi: float, m: str
) -> dict | None:
    """C2's difference in differences (finetune - scratch at lo) - (the same at hi), over the
    repeats every cell ran, paired over repeats and over test users."""
    cells = [("finetune", lo), ("scratch", lo), ("finetune", hi), ("scratch", hi)]
    s = [dict(zip(*tests.series(label, model, mode, r, m))) for mode, r in cells]
    common = sorted(set.intersection(*(set(v) for v in s)))
    if len(common) < 2:
        return None
    t = interaction_test(*(np.array([v[c] for c in common]) for v in s))
    coefs = (1.0, -1.0, -1.0, 1.0)
    u = tests.over_users(
        label, m, [(c, (model, mode, r)) for c, (mode, r) in zip(coefs, cells)], common
    )
    return {**t, **_users(u), "p": both_p(t["p_ttest"], u["p_users"])}


def _verdicts(family: list[dict], key: str, alpha: float = 0.05) -> list[dict]:
    """Holm over the family's `p` (over repeats and users); `key` holds when the mean difference
    is > 0 and the adjusted p < alpha; `fragile` when that p is within 3x of alpha."""
    adjusted = holm([f.get("p", float("nan")) for f in family])
    for f, p in zip(family, adjusted):
        f["p_holm"] = nan_none(p)
        f[key] = bool(f.get("mean_diff", 0.0) > 0 and not np.isnan(p) and p < alpha)
        f["fragile"] = fragile(nan_none(p), alpha)
    return family


def _best_on_valid(cells: list[dict], m: str) -> dict | None:
    """The cell with the best mean validation score on `m` (ties: the first in (model, mode)
    order); a cell without a test or validation mean is never chosen."""
    cs = sorted(
        (c for c in cells if c[f"{m}_mean"] is not None and c[f"{m}_valid_mean"] is not None),
        key=lambda c: (c["model"], c["mode"]),
    )
    return max(cs, key=lambda c: c[f"{m}_valid_mean"]) if cs else None


def versus_baselines(tests: Comparisons, cells: list[dict], metrics: list[str]) -> list[dict]:
    """Per (label, ratio, metric): the strongest baseline and the best pre-trained cell, both
    chosen by their mean validation score over repeats (never by the test score they are then
    compared on; ties: the first in (model, mode) order), and a paired test (over repeats and
    over test users) of the best pre-trained cell against that baseline. `above_baseline` like a claim's `holds`: mean difference > 0
    and p < 0.05 after Holm's correction over the task's comparisons on the same metric. (Not
    being below the baseline by the means is no verdict: on labels independent of behaviors it
    happens in about half the comparisons; docs/data.md, "Controls for the statistics".)"""
    out = []
    groups = {(c["label"], c["ratio"]) for c in cells}
    for label, ratio in sorted(groups):
        here = [c for c in cells if c["label"] == label and c["ratio"] == ratio]
        for m in metrics:
            key = f"{m}_mean"

            base = _best_on_valid([c for c in here if c["mode"] == "baseline"], m)
            pre = _best_on_valid([c for c in here if c["mode"] in PRETRAINED], m)
            scratch = _best_on_valid([c for c in here if c["mode"] == "scratch"], m)
            if base is None or pre is None:
                continue
            t = tests.paired(
                label, (pre["model"], pre["mode"]), (base["model"], "baseline"), ratio, m
            )
            out.append(
                {
                    "label": label,
                    "ratio": ratio,
                    "metric": m,
                    "baseline": base["model"],
                    "baseline_mean": base[key],
                    "baseline_valid_mean": base[f"{m}_valid_mean"],
                    "baseline_ci": [base[f"{m}_ci_lo"], base[f"{m}_ci_hi"]],
                    "pretrained": f"{pre['model']}/{pre['mode']}",
                    "pretrained_mean": pre[key],
                    "pretrained_valid_mean": pre[f"{m}_valid_mean"],
                    "scratch": scratch and scratch["model"],
                    "scratch_mean": scratch and scratch[key],
                    # A tie (equal up to float rounding of the mean) is not a loss.
                    "pretrained_below_baseline": pre[key] < base[key] - 1e-9,
                    "within_baseline_ci": base[f"{m}_ci_lo"] is not None
                    and pre[key] >= base[f"{m}_ci_lo"],
                    **(
                        {k: t[k] for k in ("p_ttest", "p_users", "se_users", "p", "mean_diff")}
                        if t
                        else {}
                    ),
                }
            )
    for m in metrics:
        _verdicts([v for v in out if v["metric"] == m], "above_baseline")
    return out
