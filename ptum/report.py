"""Stage `report`: reports/results.md laid out like the paper's Tables 2-3, with provenance.

Everything in the file is read from the pipeline's own outputs (finetune, sensitivity, pretrain
metrics, the data report) or recomputed from them (the paired tests on the non-primary metric,
from the per-seed runs); nothing is typed in by hand.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

from ptum.finetune.grid import summarize

MODE_NAMES = {
    "scratch": "{m}",
    "frozen": "{m}+PTUM (no finetune)",
    "finetune": "{m}+PTUM (finetune)",
}
MODEL_NAMES = {
    "han": "HAN",
    "hura": "HURA",
    "hsa": "HSA",
    "gru4rec": "GRU4Rec",
    "nativectr": "NativeCTR",
    "bert4rec": "BERT4Rec",
}


def _pct(mean: float, std: float) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def _p(p: float | None) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "n/a"
    return f"{p:.3g}"


def _table(res: dict, metrics: list[str], names: list[str]) -> list[str]:
    """One table per label: rows model x mode (+ baselines), columns ratio x metric."""
    lines: list[str] = []
    cells = res["summary"]
    ratios = sorted({c["ratio"] for c in cells})
    labels = list(dict.fromkeys(c["label"] for c in cells))
    for label in labels:
        if len(labels) > 1 or label != "click":
            lines.append(f"**{label}** (test, mean ± std over {res['repeats']} seeds, %)\n")
        head = "| method | " + " | ".join(f"{round(r * 100)}% {n}" for r in ratios for n in names)
        lines += [head + " |", "|---" * (1 + len(ratios) * len(names)) + "|"]
        models = list(dict.fromkeys(c["model"] for c in cells if c["label"] == label))
        for b in [b for b in res["baselines"] if b["label"] == label and b["ratio"] == ratios[0]]:
            row = [f"baseline: {b['baseline']}"]
            for r in ratios:
                match = [
                    x
                    for x in res["baselines"]
                    if x["label"] == label and x["baseline"] == b["baseline"] and x["ratio"] == r
                ][0]
                row += [f"{100 * match[m]:.2f}" for m in metrics]
            lines.append("| " + " | ".join(row) + " |")
        for m in models:
            for mode in ("scratch", "frozen", "finetune"):
                found = {
                    c["ratio"]: c
                    for c in cells
                    if c["label"] == label and c["model"] == m and c["mode"] == mode
                }
                if not found:
                    continue
                row = [MODE_NAMES[mode].format(m=MODEL_NAMES.get(m, m))]
                for r in ratios:
                    c = found.get(r)
                    row += [_pct(c[f"{x}_mean"], c[f"{x}_std"]) if c else "" for x in metrics]
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return lines


def all_tests(res: dict, metrics: list[str]) -> list[dict]:
    """Paired tests vs scratch on every metric: the stage's own (on its primary metric,
    metrics[0]) and, recomputed from the per-seed runs with the same `summarize`, the others."""
    tests = [t for t in res["tests"] if t["metric"] == metrics[0]]
    for m in metrics[1:]:
        tests += summarize(res["runs"], metrics, m)["tests"]
    return tests


def _tests(tests: list[dict]) -> list[str]:
    lines = [
        "| label | model | ratio | comparison | metric | mean diff (pts) | wins | p (paired t) "
        "| p (Wilcoxon) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in tests:
        lines.append(
            f"| {t['label']} | {MODEL_NAMES.get(t['model'], t['model'])} | "
            f"{round(t['ratio'] * 100)}% | {t['comparison']} | {t['metric']} | "
            f"{100 * t['mean_diff']:+.2f} | {t['wins']}/{t['n']} | {_p(t['p_ttest'])} | "
            f"{_p(t['p_wilcoxon'])} |"
        )
    return lines + [""]


def claims(res: dict, primary: str, tests: list[dict] | None = None) -> list[str]:
    """The paper's three claims, checked on this task's numbers in metric `primary` (tests:
    paired tests on several metrics, default the stage's; those on `primary` are used)."""
    cells = {
        (c["label"], c["model"], c["mode"], c["ratio"]): c[f"{primary}_mean"]
        for c in res["summary"]
    }
    ratios = sorted({k[3] for k in cells})
    pairs = sorted({(k[0], k[1]) for k in cells})
    tests = {
        (t["label"], t["model"], t["ratio"]): t
        for t in (tests or res["tests"])
        if t["comparison"].startswith("finetune") and t["metric"] == primary
    }
    out = []
    for r in ratios:
        wins = [
            p
            for p in pairs
            if (p + ("finetune", r)) in cells
            and (p + ("scratch", r)) in cells
            and cells[p + ("finetune", r)] > cells[p + ("scratch", r)]
        ]
        sig = [
            p
            for p in wins
            if tests.get(p + (r,), {}).get("p_ttest", 1.0) is not None
            and tests.get(p + (r,), {}).get("p_ttest", 1.0) < 0.05
        ]
        out.append(
            f"- finetune beats scratch at {round(r * 100)}% labels on {len(wins)}/"
            f"{len(pairs)} (label, model) pairs; {len(sig)} with paired t-test p < 0.05."
        )
    if len(ratios) > 1:
        lo, hi = ratios[0], ratios[-1]
        gaps = [
            (
                cells[p + ("finetune", lo)] - cells[p + ("scratch", lo)],
                cells[p + ("finetune", hi)] - cells[p + ("scratch", hi)],
            )
            for p in pairs
            if all(p + (m, r) in cells for m in ("finetune", "scratch") for r in (lo, hi))
        ]
        larger = sum(a > b for a, b in gaps)
        out.append(
            f"- the gain is larger at {round(lo * 100)}% than at {round(hi * 100)}% labels "
            f"on {larger}/{len(gaps)} pairs (mean gain {100 * _mean([a for a, _ in gaps]):+.2f}"
            f" vs {100 * _mean([b for _, b in gaps]):+.2f} pts)."
        )
    ft_vs_frozen = [
        (p, r)
        for p in pairs
        for r in ratios
        if p + ("finetune", r) in cells and p + ("frozen", r) in cells
    ]
    better = sum(cells[p + ("finetune", r)] > cells[p + ("frozen", r)] for p, r in ft_vs_frozen)
    out.append(
        f"- finetune beats frozen (no finetune) in {better}/{len(ft_vs_frozen)} "
        "(label, model, ratio) cells."
    )
    return out + [""]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _git_rev() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        ).stdout.strip()
        return rev + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def build(
    *,
    finetune: dict[str, Path],
    sensitivity: Path | None,
    pretrain: dict[str, Path],
    data_report: Path,
    raw_manifest: Path,
    params: dict,
    out: Path,
) -> str:
    """Write results.md; returns its text."""
    lines = [
        "# Results",
        "",
        "Produced by the `report` stage from the pipeline's own outputs. "
        "Test metrics are computed once per run on held-out users/impressions, after "
        "model selection on the validation split.",
        "",
    ]
    manifest = json.loads(raw_manifest.read_text()) if raw_manifest.exists() else {}
    data = json.loads(data_report.read_text())
    b = data["behaviors"]
    lines += [
        "## Data",
        "",
        f"- source: `{manifest.get('source', '?')}` "
        + (
            f"(size `{manifest['size']}`, seed {manifest['seed']})"
            if "size" in manifest
            else f"(`{manifest.get('variant', manifest.get('path', ''))}`)"
        ),
        f"- {b['users']:,} users, {b['rows_kept']:,} behaviors, {b['items']:,} items; "
        f"labels: {data['labels']['rows_kept']:,} users "
        f"(splits {data['labels'].get('splits', {})}); impressions by window "
        f"{data['impressions'].get('windows', {})}",
        "- data version (SHA-256 of the raw files): "
        + ", ".join(f"`{k}` {v[:12]}" for k, v in manifest.get("files", {}).items()),
        f"- git revision: `{_git_rev()}`",
        "",
    ]
    if pretrain:
        lines += [
            "## Pre-training (held-out users)",
            "",
            "| model | epochs | MBP acc | NBP acc | chance | valid loss | users/s |",
            "|---|---|---|---|---|---|---|",
        ]
        for arch, path in pretrain.items():
            if not path.exists():
                continue
            m = json.loads(path.read_text())
            lines.append(
                f"| {MODEL_NAMES.get(arch, arch)} | {m.get('epochs')} | "
                f"{m.get('valid_mbp_acc', float('nan')):.3f} | "
                f"{m.get('valid_nbp_acc', float('nan')):.3f} | {m['chance_acc']:.3f} | "
                f"{m.get('valid_loss', float('nan')):.3f} | "
                f"{m.get('users_per_s', float('nan')):.0f} |"
            )
        lines.append("")
    names = {
        "demo": (["acc", "macro_f1"], ["Acc.", "Macro-F"]),
        "ctr": (["auc", "ap"], ["AUC", "AP"]),
    }
    titles = {
        "demo": "Demographic prediction (cf. paper Table 2)",
        "ctr": "CTR prediction (cf. paper Table 3)",
    }
    for task, path in finetune.items():
        if not path.exists():
            continue
        res = json.loads(path.read_text())
        metrics, heads = names[task]
        lines += [f"## {titles[task]}", ""] + _table(res, metrics, heads)
        tests = all_tests(res, metrics)
        for m in metrics:
            lines += [f"### The paper's claims on this data ({task}, {m})", ""]
            lines += claims(res, m, tests)
        lines += [f"### Paired comparisons across seeds ({task})", ""] + _tests(tests)
    if sensitivity is not None and sensitivity.exists():
        sens = json.loads(sensitivity.read_text())
        lines += ["## Ablation and sensitivity (cf. paper Figs. 3-5)", ""]
        for task, res in sens.items():
            lines.append(
                f"{MODEL_NAMES.get(res['model'], res['model'])} on {task}, "
                f"{round(res['ratio'] * 100)}% labels, test {res['metric']} "
                f"(mean over labels and seeds):\n"
            )
            lines += ["| experiment | mean | n |", "|---|---|---|"]
            for name, e in res["experiments"].items():
                lines.append(f"| {name} | {100 * e['mean']:.2f} | {e['n']} |")
            lines += [
                "",
                f"![ablation](figures/{task}_ablation.png) "
                f"![lambda](figures/{task}_lambda.png) ![K](figures/{task}_k.png)",
                "",
            ]
    lines += [
        "## Parameters",
        "",
        "```json",
        json.dumps(params, indent=1, sort_keys=True),
        "```",
        "",
    ]
    text = "\n".join(lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text
