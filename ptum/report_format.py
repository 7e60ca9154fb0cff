"""How the report writes numbers and method names (shared by ptum.report's tables)."""

from __future__ import annotations

import math

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


def pct(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{100 * x:.2f}"


def pval(p: float | None) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "n/a"
    return f"{p:.3g}"


def method(model: str, mode: str) -> str:
    if mode == "baseline":
        return f"baseline: {model}"
    return MODE_NAMES[mode].format(m=MODEL_NAMES.get(model, model))
