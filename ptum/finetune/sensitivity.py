"""Stage `sensitivity`: the paper's ablation (Fig. 3) and λ / K sweeps (Figs. 4-5).

For each task, one user model (paper: HSA on Demo, BERT4Rec on CTR) is pre-trained once per
distinct variant — MBP only, NBP only, both, each λ, each K — with everything else as in the
`pretrain` section, then fine-tuned at one label ratio over `repeats` seeds. "none" is the same
model trained from scratch. Variants that coincide (λ = 0 is MBP only; the default λ and K are
"both") are pre-trained once and reused.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ptum.config import FinetuneConfig, PretrainConfig, SensitivityConfig
from ptum.data.prepare.tasks import why_unavailable
from ptum.finetune.cells import DEFAULT_SPLIT, SplitSpec
from ptum.finetune.stage import config_grid
from ptum.pretrain.stage import run_stage as pretrain_stage


def variant_key(mbp: bool, nbp: bool, lam: float, k: int) -> str:
    if not nbp or lam == 0:
        return "mbp_only"
    if not mbp:
        return f"nbp_only_k{k}"
    return f"both_lam{lam:g}_k{k}"


def plan(pre: PretrainConfig, opts: SensitivityConfig) -> dict[str, dict[str, str]]:
    """Experiment name -> {group, x, variant}; variants are the distinct pre-trainings."""
    out = {
        "mbp_only": {
            "group": "ablation",
            "x": "MBP",
            "variant": variant_key(True, False, 0, pre.k),
        },
        "nbp_only": {
            "group": "ablation",
            "x": "NBP",
            "variant": variant_key(False, True, pre.lam, pre.k),
        },
        "both": {
            "group": "ablation",
            "x": "MBP+NBP",
            "variant": variant_key(True, True, pre.lam, pre.k),
        },
    }
    for lam in opts.lams:
        out[f"lam={lam:g}"] = {
            "group": "lambda",
            "x": f"{lam:g}",
            "variant": variant_key(True, True, lam, pre.k),
        }
    for k in opts.ks:
        out[f"K={k}"] = {"group": "k", "x": str(k), "variant": variant_key(True, True, pre.lam, k)}
    return out


def _variant_config(pre: PretrainConfig, key: str) -> PretrainConfig:
    if key == "mbp_only":
        return replace(pre, nbp=False)
    if key.startswith("nbp_only"):
        return replace(pre, mbp=False, k=int(key.split("_k")[1]))
    lam, k = key.removeprefix("both_lam").split("_k")
    return replace(pre, lam=float(lam), k=int(k))


@dataclass(frozen=True)
class _Inputs:
    """What every grid and variant pre-training of the stage reads and where it writes."""

    prepared: Path
    tokenized: Path
    max_behaviors: int
    models_root: Path
    main_ckpts: Path
    cache_dir: Path
    reports: Path
    split: SplitSpec


def run(
    pre: PretrainConfig,
    ft: FinetuneConfig,
    opts: SensitivityConfig,
    *,
    prepared: Path,
    tokenized: Path,
    max_behaviors: int,
    models_root: Path,
    main_ckpts: Path,
    cache_dir: Path,
    reports: Path,
    split: SplitSpec = DEFAULT_SPLIT,
) -> dict:
    """Run every variant of every task; writes reports/sensitivity.json and figures."""
    inputs = _Inputs(
        prepared, tokenized, max_behaviors, models_root, main_ckpts, cache_dir, reports, split
    )
    experiments = plan(pre, opts)
    results: dict[str, dict] = {}
    # The stage's directory outputs exist even when no task is available (DVC requires them).
    for d in (models_root, cache_dir, reports / "sensitivity" / "pretrain"):
        d.mkdir(parents=True, exist_ok=True)
    for task in opts.tasks:
        model = opts.demo_model if task == "demo" else opts.ctr_model
        metric = "acc" if task == "demo" else "auc"
        results[task] = {"model": model, "metric": metric, "ratio": opts.ratio}
        why = why_unavailable(task, prepared)
        if why is not None:  # a normal outcome: nothing to fine-tune, so no variant to train
            print(f"sensitivity: {task} skipped: not available ({why})", file=sys.stderr)
            results[task].update(available=False, why_not=why, experiments={})
            continue
        per_exp: dict[str, dict] = {}
        done: dict[str, list[dict]] = {}
        for name, exp in experiments.items():
            key = exp["variant"]
            if key not in done:
                ckpt_root = _variant_checkpoints(pre, key, model, inputs)
                done[key] = _grid(ft, opts, inputs, task, model, "finetune", ckpt_root)
            per_exp[name] = {**exp, **_aggregate(done[key], metric)}
        scratch = _grid(ft, opts, inputs, task, model, "scratch", main_ckpts)
        per_exp["none"] = {
            "group": "ablation",
            "x": "none",
            "variant": "scratch",
            **_aggregate(scratch, metric),
        }
        results[task]["experiments"] = per_exp
    return results


def _variant_checkpoints(pre: PretrainConfig, key: str, model: str, inputs: _Inputs) -> Path:
    """The checkpoint root of variant `key`: the main pre-training's when it already is that
    variant, else one pre-trained here under models_root/key."""
    variant = _variant_config(pre, key)
    if variant == pre:
        return inputs.main_ckpts
    ckpt_root = inputs.models_root / key
    pretrain_stage(
        variant,
        model,
        prepared=inputs.prepared,
        tokenized=inputs.tokenized,
        max_behaviors=inputs.max_behaviors,
        out_dir=ckpt_root / model,
        report_dir=inputs.reports / "sensitivity" / "pretrain" / key / model,
    )
    return ckpt_root


def _grid(
    ft: FinetuneConfig,
    opts: SensitivityConfig,
    inputs: _Inputs,
    task: str,
    model: str,
    mode: str,
    ckpt_root: Path,
) -> list[dict]:
    """The `mode` cells of `model` at the sensitivity ratio, checkpoints under ckpt_root."""
    return config_grid(
        ft,
        task,
        models=[model],
        modes=[mode],
        ratios=[opts.ratio],
        repeats=opts.repeats,
        prepared=inputs.prepared,
        tokenized=inputs.tokenized,
        max_behaviors=inputs.max_behaviors,
        split=inputs.split,
        ckpt_root=ckpt_root,
        cache_dir=inputs.cache_dir,
        baselines=False,
    )


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
