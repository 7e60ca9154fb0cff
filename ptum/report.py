"""The results report: reports/results.md laid out like the paper's Tables 2-3, with provenance.

Everything in the file is read from the pipeline's own outputs (finetune summaries and tests,
sensitivity, pretrain metrics, the data report); nothing is typed in by hand. Each task section
opens with the comparison against the strongest baseline, losses first.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from ptum.data import verified
from ptum.report_format import MODEL_NAMES, method, pct, pval


def _cell_text(c: dict, m: str) -> str:
    return (
        f"{pct(c[f'{m}_mean'])} ± {pct(c[f'{m}_std'])} "
        f"[{pct(c[f'{m}_ci_lo'])}, {pct(c[f'{m}_ci_hi'])}]"
    )


def _table(res: dict, metrics: list[str], names: list[str]) -> list[str]:
    """One table per label: rows baselines then model x mode; per ratio and metric
    mean ± std over repeats [95% bootstrap CI over test users] (CTR: + per-user AUC)."""
    lines: list[str] = []
    cells = res["summary"]
    ratios = sorted({c["ratio"] for c in cells})
    labels = list(dict.fromkeys(c["label"] for c in cells))
    cols = list(zip(metrics, names))
    if any("user_auc_mean" in c for c in cells):
        cols.append(("user_auc", "per-user AUC"))
    for label in labels:
        lines.append(
            f"**{label}**: test, %, mean ± std over {res['repeats']} repeats (each re-draws the "
            "split) [95% CI, bootstrap over test users]\n"
        )
        head = "| method | " + " | ".join(f"{round(r * 100)}% {n}" for r in ratios for _, n in cols)
        lines += [head + " |", "|---" * (1 + len(ratios) * len(cols)) + "|"]
        here = [c for c in cells if c["label"] == label]
        order = [c for c in here if c["mode"] == "baseline"]
        order += sorted(
            (c for c in here if c["mode"] != "baseline"),
            key=lambda c: ("scratch", "frozen", "finetune").index(c["mode"]),
        )
        methods = list(dict.fromkeys((c["model"], c["mode"]) for c in order))
        if any(c["mode"] != "baseline" for c in here):
            models = list(dict.fromkeys(c["model"] for c in here if c["mode"] != "baseline"))
            methods = [x for x in methods if x[1] == "baseline"] + [
                (m, mode)
                for m in models
                for mode in ("scratch", "frozen", "finetune")
                if (m, mode) in methods
            ]
        for model, mode in methods:
            row = [method(model, mode)]
            for r in ratios:
                c = next(
                    (
                        x
                        for x in here
                        if x["model"] == model and x["mode"] == mode and x["ratio"] == r
                    ),
                    None,
                )
                for m, _ in cols:
                    if c is None:
                        row.append("")
                    elif m == "user_auc":
                        row.append(f"{pct(c['user_auc_mean'])} ± {pct(c['user_auc_std'])}")
                    else:
                        row.append(_cell_text(c, m))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return lines


BOTH = (
    "the larger of a paired t over repeats and a paired bootstrap over test users (a "
    "difference counts only if it holds in both), Holm-adjusted"
)
FRAGILE = " (fragile: Holm p within 3x of 0.05)"


def versus_baselines(res: dict) -> list[str]:
    """The comparison users ask for first: the best pre-trained cell against the strongest
    baseline of the same label and ratio (both chosen on validation), losses stated first."""
    rows = res.get("versus_baselines", [])
    lost = [v for v in rows if v["pretrained_below_baseline"]]
    won = [v for v in rows if v.get("above_baseline")]
    lines = [
        f"The best pre-trained cell is below the strongest baseline in {len(lost)} of {len(rows)} "
        f"(label, ratio, metric) comparisons, and above it in {len(won)} (mean difference "
        f"> 0, Holm-adjusted p < 0.05; p {BOTH}). Both sides are chosen by their mean "
        "validation score over repeats; the table gives their test scores.",
        "",
        "| label | ratio | metric | strongest baseline | mean [95% CI] | best pre-trained | mean "
        "| diff (pts) | p (repeats) | p (users) | p (Holm) | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in sorted(rows, key=lambda v: not v["pretrained_below_baseline"]):
        lo, hi = v["baseline_ci"]
        if v["pretrained_below_baseline"]:
            verdict = "below baseline" + (" (within its CI)" if v["within_baseline_ci"] else "")
        elif v.get("above_baseline"):
            verdict = "above baseline"
        else:
            verdict = "not below, not significantly above"
        verdict += FRAGILE if v.get("fragile") else ""
        model, mode = v["pretrained"].split("/")
        lines.append(
            f"| {v['label']} | {round(v['ratio'] * 100)}% | {v['metric']} | {v['baseline']} | "
            f"{pct(v['baseline_mean'])} [{pct(lo)}, {pct(hi)}] | {method(model, mode)} | "
            f"{pct(v['pretrained_mean'])} | {100 * (v['pretrained_mean'] - v['baseline_mean']):+.2f} | "
            f"{pval(v.get('p_ttest'))} | {pval(v.get('p_users'))} | {pval(v.get('p_holm'))} | {verdict} |"
        )
    return lines + [""]


def learning_curves(histories: dict[str, Path], points: int = 6) -> list[str]:
    """Held-out MBP / NBP accuracy at a few epochs of each pre-training run: has it converged?
    The last column is the change over the last quarter of the epochs."""
    rows = []
    for arch, path in histories.items():
        if not path.exists():
            continue
        h = json.loads(path.read_text())
        if not h:
            continue
        n = len(h)
        picks = sorted({round(i * (n - 1) / (points - 1)) for i in range(points)})
        q = max(n - 1 - max(n // 4, 1), 0)
        cells = [
            f"{h[i]['epoch']}: {h[i].get('valid_mbp_acc', float('nan')):.2f} / "
            f"{h[i].get('valid_nbp_acc', float('nan')):.2f}"
            for i in picks
        ]
        delta = h[-1].get("valid_mbp_acc", float("nan")) - h[q].get("valid_mbp_acc", float("nan"))
        rows.append(
            f"| {MODEL_NAMES.get(arch, arch)} | " + " · ".join(cells) + f" | {100 * delta:+.1f} |"
        )
    if not rows:
        return []
    return [
        "Learning curves (epoch: held-out MBP / NBP accuracy; last column: change of MBP "
        "accuracy over the last quarter of the epochs, points; near 0 = converged):",
        "",
        "| model | curve | MBP change, last quarter |",
        "|---|---|---|",
        *rows,
        "",
    ]


CLAIMS = {
    "C1": "fine-tuned beats scratch at the lowest label ratio",
    "C2": "the gain over scratch is larger at the lowest ratio than at the highest (interaction)",
    "C3": "fine-tuned beats frozen (no finetune) at the lowest label ratio",
}


def claims(res: dict) -> list[str]:
    """The paper's claims with a Holm-corrected verdict (per metric, over every claim test of
    the task), then each test."""
    rows = res.get("claims", [])
    lines = [f"Each claim's p: {BOTH}.", ""] if rows else []
    for m in dict.fromkeys(r["metric"] for r in rows):
        here = [r for r in rows if r["metric"] == m]
        for c, text in CLAIMS.items():
            tests = [r for r in here if r["claim"] == c]
            if tests:
                held = sum(r["holds"] for r in tests)
                shaky = sum(r.get("fragile", False) for r in tests)
                lines.append(
                    f"- {m}, {c} ({text}): holds for {held}/{len(tests)} (label, model) pairs "
                    "(mean difference > 0, Holm-adjusted p < 0.05)"
                    + (
                        f"; {shaky} verdict(s) fragile (Holm p within 3x of 0.05)."
                        if shaky
                        else "."
                    )
                )
    lines += [
        "",
        "| claim | metric | label | model | ratio | mean diff (pts) | wins | p (repeats) "
        "| p (users) | p (Holm) | p (Wilcoxon) | holds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["ratio"] if isinstance(r["ratio"], str) else f"{round(r['ratio'] * 100)}%"
        lines.append(
            f"| {r['claim']} | {r['metric']} | {r['label']} | "
            f"{MODEL_NAMES.get(r['model'], r['model'])} | {ratio} | {100 * r['mean_diff']:+.2f} | "
            f"{r['wins']}/{r['n']} | {pval(r['p_ttest'])} | {pval(r.get('p_users'))} | "
            f"{pval(r['p_holm'])} | {pval(r['p_wilcoxon'])} | {'yes' if r['holds'] else 'no'}"
            f"{FRAGILE if r.get('fragile') else ''} |"
        )
    return lines + [""]


def _tests(tests: list[dict]) -> list[str]:
    lines = [
        "| label | model | ratio | comparison | metric | mean diff (pts) | wins | p (repeats) "
        "| p (users) | p (Wilcoxon) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in tests:
        lines.append(
            f"| {t['label']} | {MODEL_NAMES.get(t['model'], t['model'])} | "
            f"{round(t['ratio'] * 100)}% | {t['comparison']} | {t['metric']} | "
            f"{100 * t['mean_diff']:+.2f} | {t['wins']}/{t['n']} | {pval(t['p_ttest'])} | "
            f"{pval(t.get('p_users'))} | {pval(t['p_wilcoxon'])} |"
        )
    return lines + [""]


CODE = Path(__file__).resolve().parent  # the ptum package: what marks a report's revision dirty


def _git_rev(code: Path = CODE) -> str:
    """Short commit of the code that made the report, marked when files under `code` differ
    (not the result set's own outputs, which the very run rewrites)."""
    try:
        git = ["git", "-C", str(code)]
        rev = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        status = [*git, "status", "--porcelain", "--untracked-files=no", "--", "."]
        dirty = subprocess.run(status, capture_output=True, text=True).stdout.strip()
        return rev + (" (with uncommitted changes to ptum/)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# Per fine-tuning task: the metrics of its tables with their column names, and its section title.
TASK_METRICS = {
    "demo": (["acc", "macro_f1"], ["Acc.", "Macro-F"]),
    "ctr": (["auc", "ap"], ["AUC", "AP"]),
}
TASK_TITLES = {
    "demo": "Demographic prediction (cf. paper Table 2)",
    "ctr": "CTR prediction (cf. paper Table 3)",
}


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
    """Write results.md; returns its text. A missing finetune result, pre-training metrics file
    or sensitivity file leaves its section out."""
    lines = [
        "# Results",
        "",
        "Produced by the `report` stage from the pipeline's own outputs. "
        "Test metrics are computed once per run on held-out users/impressions, after "
        "model selection on the validation split.",
        "",
    ]
    lines += _data_section(data_report, raw_manifest)
    if pretrain:
        lines += _pretrain_section(pretrain)
    for task, path in finetune.items():
        if path.exists():
            lines += _task_section(task, json.loads(path.read_text()))
    if sensitivity is not None and sensitivity.exists():
        lines += _sensitivity_section(json.loads(sensitivity.read_text()))
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


def _data_section(data_report: Path, raw_manifest: Path) -> list[str]:
    """Source, sizes, data version (raw file hashes) and git revision."""
    manifest = json.loads(raw_manifest.read_text()) if raw_manifest.exists() else {}
    data = verified.read_json(data_report, "prepare")
    b = data["behaviors"]
    return [
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


def _speed(users_per_s: float | None) -> str:
    return "—" if users_per_s is None or users_per_s != users_per_s else f"{users_per_s:.0f}"


def _pretrain_section(pretrain: dict[str, Path]) -> list[str]:
    """Held-out MBP/NBP figures of each architecture's metrics.json, then learning curves."""
    lines = [
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
            f"{_speed(m.get('users_per_s'))} |"
        )
    lines += [
        "",
        "users/s: the last epoch trained in the stage's last run; — when that run only "
        "loaded a finished checkpoint (nothing was timed).",
        "",
    ]
    return lines + learning_curves({a: p.with_name("history.json") for a, p in pretrain.items()})


def _task_section(task: str, res: dict) -> list[str]:
    """One fine-tuning task (demo | ctr): against the strongest baseline, all methods, the
    paper's claims, paired comparisons with scratch."""
    metrics, heads = TASK_METRICS[task]
    if res.get("available") is False:
        return [f"## {TASK_TITLES[task]}", "", f"Not available on this data: {res['why_not']}.", ""]
    lines = [f"## {TASK_TITLES[task]}", "", "### Against the strongest baseline", ""]
    lines += versus_baselines(res)
    lines += ["### All methods", ""] + _table(res, metrics, heads)
    lines += [f"### The paper's claims on this data ({task})", ""] + claims(res)
    lines += [f"### Paired comparisons with scratch, over repeats ({task})", ""]
    return lines + _tests(res["tests"])


def _sensitivity_section(sens: dict) -> list[str]:
    """Per task of reports/sensitivity.json: the ablation and sweep means, and its figures."""
    lines = ["## Ablation and sensitivity (cf. paper Figs. 3-5)", ""]
    for task, res in sens.items():
        if res.get("available") is False:
            lines += [f"{task}: not available on this data: {res['why_not']}.", ""]
            continue
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
    return lines
