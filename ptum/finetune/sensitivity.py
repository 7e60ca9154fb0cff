"""The paper's ablation of the pre-training tasks (Fig. 3) and its λ / K sweeps (Figs. 4-5).

For each task, one user model (paper: HSA on Demo, BERT4Rec on CTR) is pre-trained once per
distinct variant — MBP only, NBP only, both, each λ, each K — with everything else as in the
main pre-training, then fine-tuned at one label ratio over `repeats` seeds. "none" is the same
model trained from scratch. Variants that coincide (λ = 0 is MBP only; the default λ and K are
"both") are pre-trained once and reused.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ptum.data.prepare.tasks import why_unavailable
from ptum.finetune.cells import GridAxes, GridOptions
from ptum.finetune.grid import run_grid


@dataclass(frozen=True)
class Variant:
    """A pre-training's tasks and settings: what the sensitivity experiments vary."""

    mbp: bool
    nbp: bool
    lam: float  # NBP loss weight λ
    k: int  # NBP candidates K


@dataclass(frozen=True)
class Sweep:
    """The experiments of the stage: per task, one user model pre-trained once per distinct
    variant of the main pre-training, each fine-tuned at one label ratio over `repeats` seeds."""

    models: dict[str, str]  # task (demo | ctr) -> its user model, tasks in run order
    main: Variant  # the main pre-training's (the pretrain section)
    lams: tuple[float, ...]  # the λ sweep
    ks: tuple[int, ...]  # the K sweep
    ratio: float
    repeats: int


# Pre-trains `variant` of an architecture into out_dir, its reports into report_dir.
Pretrain = Callable[[Variant, str, Path, Path], object]


def variant_key(mbp: bool, nbp: bool, lam: float, k: int) -> str:
    if not nbp or lam == 0:
        return "mbp_only"
    if not mbp:
        return f"nbp_only_k{k}"
    return f"both_lam{lam:g}_k{k}"


def plan(sweep: Sweep) -> dict[str, dict[str, str]]:
    """Experiment name -> {group, x, variant}; variants are the distinct pre-trainings."""
    lam, k = sweep.main.lam, sweep.main.k
    out = {
        "mbp_only": {"group": "ablation", "x": "MBP", "variant": variant_key(True, False, 0, k)},
        "nbp_only": {"group": "ablation", "x": "NBP", "variant": variant_key(False, True, lam, k)},
        "both": {"group": "ablation", "x": "MBP+NBP", "variant": variant_key(True, True, lam, k)},
    }
    for x in sweep.lams:
        out[f"lam={x:g}"] = {
            "group": "lambda",
            "x": f"{x:g}",
            "variant": variant_key(True, True, x, k),
        }
    for x in sweep.ks:
        out[f"K={x}"] = {"group": "k", "x": str(x), "variant": variant_key(True, True, lam, x)}
    return out


def variant_of(main: Variant, key: str) -> Variant:
    """The pre-training of variant `key`: the main one with what the key changes."""
    if key == "mbp_only":
        return replace(main, nbp=False)
    if key.startswith("nbp_only"):
        return replace(main, mbp=False, k=int(key.split("_k")[1]))
    lam, k = key.removeprefix("both_lam").split("_k")
    return replace(main, lam=float(lam), k=int(k))


def run(
    sweep: Sweep, grid: GridOptions, *, pretrain: Pretrain, models_root: Path, reports: Path
) -> dict:
    """Run every variant of every task of `sweep`; returns the results `write_outputs` writes.

    grid: the fine-tuning grid's options, its checkpoints (ckpt_root) the main pre-training's
    and its cache the stage's. A variant that is not the main pre-training is pre-trained with
    `pretrain` under models_root/KEY/ARCH (its reports under reports/sensitivity/pretrain)."""
    # The stage's directory outputs exist even when no task is available (DVC requires them).
    for d in (models_root, grid.cache_dir, reports / "sensitivity" / "pretrain"):
        d.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    for task, model in sweep.models.items():
        metric = "acc" if task == "demo" else "auc"
        results[task] = {"model": model, "metric": metric, "ratio": sweep.ratio}
        why = why_unavailable(task, grid.prepared)
        if why is not None:  # a normal outcome: nothing to fine-tune, so no variant to train
            print(f"sensitivity: {task} skipped: not available ({why})", file=sys.stderr)
            results[task].update(available=False, why_not=why, experiments={})
            continue
        results[task]["experiments"] = _experiments(
            sweep, grid, task, model, pretrain, models_root, reports
        )
    return results


def _experiments(
    sweep: Sweep,
    grid: GridOptions,
    task: str,
    model: str,
    pretrain: Pretrain,
    models_root: Path,
    reports: Path,
) -> dict[str, dict]:
    """Every experiment of `task`: each distinct variant pre-trained and fine-tuned once, and
    "none", the model fine-tuned from scratch."""
    metric = "acc" if task == "demo" else "auc"
    per_exp: dict[str, dict] = {}
    done: dict[str, list[dict]] = {}
    for name, exp in plan(sweep).items():
        key = exp["variant"]
        if key not in done:
            variant = variant_of(sweep.main, key)
            ckpt_root = grid.ckpt_root
            if variant != sweep.main:
                ckpt_root = models_root / key
                report_dir = reports / "sensitivity" / "pretrain" / key / model
                pretrain(variant, model, ckpt_root / model, report_dir)
            done[key] = _grid(sweep, replace(grid, ckpt_root=ckpt_root), task, model, "finetune")
        per_exp[name] = {**exp, **_aggregate(done[key], metric)}
    scratch = _grid(sweep, grid, task, model, "scratch")
    none = {"group": "ablation", "x": "none", "variant": "scratch"}
    per_exp["none"] = {**none, **_aggregate(scratch, metric)}
    return per_exp


def _grid(sweep: Sweep, grid: GridOptions, task: str, model: str, mode: str) -> list[dict]:
    """The `mode` cells of `model` at the sweep's ratio, checkpoints under grid.ckpt_root."""
    axes = GridAxes(
        task=task,
        labels=None,
        models=(model,),
        modes=(mode,),
        ratios=(sweep.ratio,),
        repeats=sweep.repeats,
        baselines=False,
    )
    return run_grid(axes, grid)


def _aggregate(cells: list[dict], metric: str) -> dict:
    """Mean/std per label of the test metric over seeds, plus the mean over labels."""
    by_label: dict[str, list[float]] = {}
    for c in cells:
        by_label.setdefault(c["label"], []).append(c["test"][metric])
    out = {f"{lab}_mean": float(np.mean(v)) for lab, v in by_label.items()}
    out.update(
        {
            f"{lab}_std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
            for lab, v in by_label.items()
        }
    )
    out["mean"] = float(np.mean([np.mean(v) for v in by_label.values()]))
    out["n"] = len(cells)
    return out


def write_outputs(results: dict, reports: Path) -> None:
    """sensitivity.json, DVC plot tables, and one PNG per (task, group)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports.mkdir(parents=True, exist_ok=True)
    (reports / "sensitivity.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    # The stage's DVC metrics: one number per variant and task (the mean over labels of the
    # test metric); the per-label means and stds stay in sensitivity.json.
    headline = {
        task: {name: round(e["mean"], 4) for name, e in res["experiments"].items()}
        for task, res in results.items()
    }
    (reports / "sensitivity").mkdir(exist_ok=True)
    (reports / "sensitivity" / "metrics.json").write_text(json.dumps(headline, indent=1) + "\n")
    figs = reports / "figures"
    figs.mkdir(exist_ok=True)
    plots = reports / "plots"
    plots.mkdir(exist_ok=True)
    titles = {"ablation": "pre-training tasks (Fig. 3)", "lambda": "λ (Fig. 4)", "k": "K (Fig. 5)"}
    for task, res in results.items():
        for group, title in titles.items():
            exps = [e for e in res["experiments"].values() if e["group"] == group]
            if not exps:  # e.g. sensitivity.lams: [] (no λ sweep)
                continue
            if group == "ablation":
                order = ["none", "MBP", "NBP", "MBP+NBP"]
                exps = sorted(exps, key=lambda e: order.index(e["x"]))
            labels = sorted(
                {k[:-5] for e in exps for k in e if k.endswith("_mean") and k != "mean"}
            )
            rows = [
                {"x": e["x"], **{lab: round(e[f"{lab}_mean"], 5) for lab in labels}} for e in exps
            ]
            (plots / f"{task}_{group}.json").write_text(json.dumps(rows, indent=1) + "\n")
            fig, ax = plt.subplots(figsize=(5, 3.2))
            xs = np.arange(len(exps))
            for j, lab in enumerate(labels):
                means = [e[f"{lab}_mean"] for e in exps]
                stds = [e[f"{lab}_std"] for e in exps]
                if group == "ablation":
                    w = 0.8 / len(labels)
                    ax.bar(xs + j * w, means, w, yerr=stds, label=lab, capsize=3)
                else:
                    ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=lab)
            ax.set_xticks(xs + (0.4 - 0.4 / len(labels) if group == "ablation" else 0))
            ax.set_xticklabels([e["x"] for e in exps])
            ax.set_ylabel(f"test {res['metric']} ({round(res['ratio'] * 100)}% labels)")
            ax.set_title(f"{res['model']} on {task}: {title}", fontsize=10)
            lo = min(e[f"{lab}_mean"] - e[f"{lab}_std"] for e in exps for lab in labels)
            hi = max(e[f"{lab}_mean"] + e[f"{lab}_std"] for e in exps for lab in labels)
            ax.set_ylim(max(0.0, lo - 0.02), min(1.0, hi + 0.02))
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(figs / f"{task}_{group}.png", dpi=110)
            plt.close(fig)
