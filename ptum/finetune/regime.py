"""The paper's regime: pre-training pools of growing size around one fixed labeled set.

For each task, one user model is pre-trained once per pool — m x the labeled users, for each m
of `pools` (`ptum.data.pool`: the labeled users' behaviors, then unlabeled users; never a
label) — with the main pre-training's settings and epochs. Each pool's grid then runs the
task's fixed fine-tuning protocol: scratch / frozen / finetune of that model and every baseline
(the svd_* ones factorize the same pool), at `ratios`, over `repeats` re-drawn splits (the same
splits for every pool). Per pool, label, ratio and metric, two comparisons paired by repeat:

  gain  finetune - scratch;
  edge  the best pre-trained cell (frozen or finetune) - the strongest baseline, both chosen by
        their mean validation score (never the test score they are then compared on).

Each is a mean difference over repeats with its 95% t-interval, tested paired over repeats (t)
and over test users (bootstrap; ptum.finetune.stats), Holm-corrected on the larger p over every
comparison of the task on the same metric.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy import stats

from ptum.data.pool import labeled_users, pool_order
from ptum.data.prepare.tasks import why_unavailable
from ptum.finetune.cells import GridAxes, GridOptions
from ptum.finetune.grid import run_grid
from ptum.finetune.options import MODES
from ptum.finetune.results import test_users
from ptum.finetune.stats import holm, paired_test
from ptum.finetune.summary import (
    METRICS,
    PRETRAINED,
    Comparisons,
    comparisons,
    nan_none,
    predictions_frame,
)


@dataclass(frozen=True)
class Regime:
    """The experiment: per task one user model, pre-trained on each pool, fine-tuned at
    `ratios` over `repeats` re-drawn splits."""

    models: dict[str, str]  # task (demo | ctr) -> its user model, tasks in run order
    pools: tuple[int, ...]  # pool sizes, as multiples of the labeled users
    ratios: tuple[float, ...]
    repeats: int
    bootstrap: int  # replicates of the test over users
    seed: int  # of the user draws
    labeled: int | None = None  # keep this many labeled users (the rest: unlabeled); None: all


# Pre-trains an architecture on a pool of users: (user ids, arch, out_dir, report_dir).
Pretrain = Callable[[list[str], str, Path, Path], object]


def run(
    regime: Regime,
    grid: GridOptions,
    *,
    pretrain: Pretrain,
    models_root: Path,
    pretrain_reports: Path,
) -> dict:
    """Pre-train every pool of every task and run its grid; returns what `write_outputs`
    writes. Checkpoints go under models_root/poolM/ARCH, their reports under
    pretrain_reports/poolM/ARCH; grid.cache_dir caches the cells of every pool."""
    for d in (models_root, grid.cache_dir, pretrain_reports):
        d.mkdir(parents=True, exist_ok=True)
    order, labeled = pool_order(grid.prepared, regime.labeled)
    out: dict = {"labeled_users": labeled, "pretrain_users": len(order), "tasks": {}}
    if not regime.pools:
        return out
    too_big = [m for m in regime.pools if m * labeled > len(order)]
    if labeled == 0 or too_big:
        raise ValueError(
            f"regime.pools {list(regime.pools)}: the pre-training corpus has {len(order)} "
            f"training users, {labeled} of them labeled, so pools above "
            f"{len(order) // max(labeled, 1)}x do not fit; lower regime.pools or use more users"
        )
    if regime.labeled is not None:  # the tasks keep only these users' labels and impressions
        grid = replace(grid, labeled=tuple(sorted(labeled_users(grid.prepared, regime.labeled))))
    for task, model in regime.models.items():
        why = why_unavailable(task, grid.prepared)
        if why is not None:  # a normal outcome: nothing to fine-tune on
            print(f"regime: {task} skipped: not available ({why})", file=sys.stderr)
            out["tasks"][task] = {"model": model, "available": False, "why_not": why}
            continue
        rows: list[dict] = []
        axes = GridAxes(task, None, (model,), MODES, regime.ratios, regime.repeats, True)
        user_ids, n_classes = test_users(axes, grid)  # the same test users for every pool
        for m in regime.pools:
            n = m * labeled
            users = sorted(order[:n])
            ckpt_root = models_root / f"pool{m}"
            pretrain(users, model, ckpt_root / model, pretrain_reports / f"pool{m}" / model)
            runs = run_grid(axes, replace(grid, ckpt_root=ckpt_root, pool=tuple(users)))
            tests = comparisons(
                task,
                runs,
                predictions_frame(task, runs, user_ids),
                n_classes=n_classes,
                n_boot=regime.bootstrap,
                seed=regime.seed,
            )
            rows += [{"pool": m, "pool_users": n, **r} for r in compare(task, model, runs, tests)]
        for metric in METRICS[task]:
            family = [r for r in rows if r["metric"] == metric]
            ps = [np.nan if r["p"] is None else r["p"] for r in family]
            for r, p in zip(family, holm(ps)):
                r["p_holm"] = None if np.isnan(p) else float(p)
        out["tasks"][task] = {"model": model, "available": True, "rows": rows}
    return out


def compare(task: str, model: str, runs: list[dict], tests: Comparisons) -> list[dict]:
    """The gain and the edge (module docstring) per label, ratio and metric of one pool's
    grid `runs` (cell results); `tests`: their paired tests over users."""
    rows = []
    for label in sorted({r["label"] for r in runs}):
        for ratio in sorted({r["ratio"] for r in runs}):
            here = [r for r in runs if r["label"] == label and r["ratio"] == ratio]
            for metric in METRICS[task]:
                series = _series(here, metric)
                base = _best_on_valid(series, lambda k: k[1] == "baseline")
                pre = _best_on_valid(series, lambda k: k[0] == model and k[1] in PRETRAINED)
                for kind, a, b in (
                    ("gain", (model, "finetune"), (model, "scratch")),
                    ("edge", pre, base),
                ):
                    if a is None or b is None or a not in series or b not in series:
                        continue
                    diff = _paired(series[a]["test"], series[b]["test"])
                    both = tests.paired(label, a, b, ratio, metric)
                    if diff is None or both is None:
                        continue
                    diff |= {k: nan_none(both[k]) for k in ("p_users", "se_users", "p")}
                    rows.append(
                        {
                            "label": label,
                            "ratio": ratio,
                            "metric": metric,
                            "comparison": kind,
                            "a": "/".join(a),
                            "b": "/".join(b),
                            "a_mean": float(np.mean(list(series[a]["test"].values()))),
                            "b_mean": float(np.mean(list(series[b]["test"].values()))),
                            **diff,
                        }
                    )
    return rows


def _series(runs: list[dict], metric: str) -> dict[tuple[str, str], dict[str, dict[int, float]]]:
    """(model, mode) -> {"valid"|"test": {seed: score}}."""
    out: dict[tuple[str, str], dict[str, dict[int, float]]] = {}
    for r in runs:
        s = out.setdefault((r["model"], r["mode"]), {"valid": {}, "test": {}})
        s["valid"][r["seed"]] = float(r["valid"][metric])
        s["test"][r["seed"]] = float(r["test"][metric])
    return out


def _best_on_valid(series: dict, keep: Callable[[tuple[str, str]], bool]) -> tuple[str, str] | None:
    """The method among those `keep` accepts with the best mean validation score (ties: the
    first in name order; a method with no defined validation score is never chosen)."""
    cands = sorted(k for k in series if keep(k))
    scores = {k: float(np.nanmean(list(series[k]["valid"].values()))) for k in cands}
    cands = [k for k in cands if not np.isnan(scores[k])]
    return max(cands, key=lambda k: scores[k]) if cands else None


def _paired(a: dict[int, float], b: dict[int, float], level: float = 0.95) -> dict | None:
    """Mean of a - b over the seeds both have, its t-interval and the paired test."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    x, y = np.array([a[s] for s in seeds]), np.array([b[s] for s in seeds])
    d = x - y
    half = stats.t.ppf((1 + level) / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    t = paired_test(x, y)
    return {
        "diff": float(d.mean()),
        "ci_lo": float(d.mean() - half),
        "ci_hi": float(d.mean() + half),
        "n": len(d),
        "wins": t["wins"],
        "p_ttest": None if np.isnan(t["p_ttest"]) else t["p_ttest"],  # nan: no variation
    }


def write_outputs(
    results: dict, *, json_path: Path, md_path: Path, figures: Path, plot: Path
) -> None:
    """The results (json_path), the report's table (md_path), the DVC plot table (plot: one
    row per pool size, one column per task/label and comparison, in points at the lowest
    ratio on the task's first metric) and one PNG per task (figures/TASK.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for d in (json_path.parent, md_path.parent, figures, plot.parent):
        d.mkdir(parents=True, exist_ok=True)
    for stale in figures.glob("*.png"):  # the folder persists (a task may have gone)
        stale.unlink()
    json_path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    md_path.write_text(markdown(results))
    plot_rows: dict[int, dict] = {}  # pool size -> one column per task/label and comparison
    for task, res in results["tasks"].items():
        if not res.get("available"):
            continue
        metric = METRICS[task][0]
        lo = min(r["ratio"] for r in res["rows"])
        rows = [r for r in res["rows"] if r["metric"] == metric and r["ratio"] == lo]
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), sharey=True)
        for ax, kind in zip(axes, ("gain", "edge")):
            for label in sorted({r["label"] for r in rows}):
                pts = sorted(
                    (r for r in rows if r["label"] == label and r["comparison"] == kind),
                    key=lambda r: r["pool_users"],
                )
                if not pts:
                    continue
                xs = [r["pool_users"] for r in pts]
                ys = [100 * r["diff"] for r in pts]
                err = [
                    [100 * (r["diff"] - r["ci_lo"]) for r in pts],
                    [100 * (r["ci_hi"] - r["diff"]) for r in pts],
                ]
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=f"{task}/{label}")
                for r in pts:
                    row = plot_rows.setdefault(r["pool_users"], {"pool_users": r["pool_users"]})
                    row[f"{task}/{label} {kind}"] = round(100 * r["diff"], 3)
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_xscale("log")
            pools = sorted({(r["pool_users"], r["pool"]) for r in rows})
            ax.set_xticks([n for n, _ in pools], [f"{n:,}\n({m}x)" for n, m in pools])
            ax.minorticks_off()
            ax.set_xlabel("pre-training users (log scale; pool / labeled users)")
            title = "finetune - scratch" if kind == "gain" else "best pre-trained - best baseline"
            ax.set_title(f"{title}\n({metric}, {round(lo * 100)}% labels)", fontsize=9)
            ax.legend(fontsize=7)
        axes[0].set_ylabel(f"test {metric} difference (points, 95% CI)")
        fig.tight_layout()
        fig.savefig(figures / f"{task}.png", dpi=110)
        plt.close(fig)
    rows = [plot_rows[n] for n in sorted(plot_rows)]
    plot.write_text(json.dumps(rows, indent=1) + "\n")


def markdown(results: dict) -> str:
    """The regime report: per task, one table row per pool, label, ratio and metric."""
    lines = [
        "# Pre-training pool size (the paper's regime)",
        "",
        f"Labeled users (Demo label or CTR impression): {results['labeled_users']}; "
        f"pre-training corpus: {results['pretrain_users']} training users. Differences are test "
        "points (x100), mean over re-drawn splits with their 95% t-interval; p: paired over "
        "repeats (t) and over test users (bootstrap), Holm on the larger p per task and metric. gain = finetune - scratch; edge = best pre-trained "
        "cell - strongest baseline, both chosen on validation.",
        "",
    ]
    if not results["tasks"]:
        lines.append("Not run: regime.pools is empty.")
    for task, res in results["tasks"].items():
        lines += [f"## {task}: {res['model']}", ""]
        if not res.get("available"):
            lines += [f"Not available on this data: {res['why_not']}", ""]
            continue
        lines += [
            "| pool | users | label | ratio | metric | comparison | a | b | a mean | b mean "
            "| diff [95% CI] | wins | p (repeats) | p (users) | p_Holm |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in res["rows"]:
            p, pt, pu = (
                "n/a" if r.get(k) is None else f"{r[k]:.3g}"
                for k in ("p_holm", "p_ttest", "p_users")
            )
            lines.append(
                f"| {r['pool']}x | {r['pool_users']} | {r['label']} | {r['ratio']:g} | "
                f"{r['metric']} | {r['comparison']} | {r['a']} | {r['b']} | "
                f"{100 * r['a_mean']:.2f} | {100 * r['b_mean']:.2f} | {100 * r['diff']:+.2f} "
                f"[{100 * r['ci_lo']:+.2f}, {100 * r['ci_hi']:+.2f}] | {r['wins']}/{r['n']} | {pt} | {pu} "
                f"| {p} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"
