"""The data report (report.json): rows read = kept + dropped per reason for every table (the
validation counts), then what prepare built: users, items, CTR windows, label splits and
balance, the pre-training corpus, the tasks the data allows. Its headline numbers, a dozen, go
to metrics.json (the stage's DVC metric)."""

from __future__ import annotations

from typing import cast

import polars as pl

from ptum.data.prepare.in_memory import Core
from ptum.data.prepare.options import PrepareOptions
from ptum.data.prepare.splits import ratio_column
from ptum.data.prepare.tasks import tasks_of
from ptum.data.prepare.validate import DUPLICATE


def _num(value: object) -> float:
    """An aggregate of a numeric column as a float (polars types it as any Python value)."""
    return float(cast(float, value))


def distribution(values: pl.Series) -> dict[str, float]:
    """min, p10, p25, p50, p75, p90, mean and max of `values` ({} when empty)."""
    if values.len() == 0:
        return {}
    q = {
        f"p{int(p * 100)}": _num(values.quantile(p, "nearest")) for p in (0.1, 0.25, 0.5, 0.75, 0.9)
    }
    return {
        "min": _num(values.min()),
        **q,
        "mean": round(_num(values.mean()), 3),
        "max": _num(values.max()),
    }


def complete_report(
    report: dict,
    core: Core,
    outputs: dict[str, pl.DataFrame],
    opts: PrepareOptions,
) -> None:
    """Add to `report` (the validation counts of each table) what the written `outputs`
    (impressions, labels, users as in their files) hold; check that every table reconciles."""
    imps_out, labels_out, users_out = (outputs[t] for t in ("impressions", "labels", "users"))
    items, label_cols, before_test = core.items, core.label_cols, core.before_test
    window_counts = dict(imps_out.group_by("window").len().iter_rows())
    report["behaviors"].update(
        users=users_out.height,
        items=items.height,
        items_from_behaviors=int((items["n_behaviors"] > 0).sum()),
        behaviors_per_user=distribution(users_out["n_behaviors"]),
        truncated_users=int((before_test["n_total"] > opts.max_behaviors).sum()),
    )
    report["impressions"].update(
        windows={
            "history_not_used": core.n_history,
            **{k: int(v) for k, v in sorted(window_counts.items())},
        },
        click_rate={
            w: round(_num(imps_out.filter(pl.col("window") == w)["clicked"].mean() or 0), 4)
            for w in ("train", "valid", "test")
        },
        subsets={ratio_column(r): int(imps_out[ratio_column(r)].sum()) for r in opts.label_ratios},
    )
    report["labels"].update(
        label_columns=label_cols,
        splits=_counts(labels_out, "split"),
        subsets={
            ratio_column(r): int(labels_out[ratio_column(r)].sum()) for r in opts.label_ratios
        },
        balance={c: _counts(labels_out, c) for c in label_cols},
    )
    split = users_out["pretrain_split"]
    report["pretrain"] = {
        "users": int(split.is_not_null().sum()),
        "valid_users": int((split == "valid").sum()),
        "behaviors_before_test": int(before_test["n_total"].sum()),
    }
    report["tasks"] = tasks_of(labels_out, imps_out)
    for t in ("behaviors", "labels", "impressions"):
        r = report[t]
        r["reconciles"] = r["rows_read"] == r["rows_kept"] + sum(r["rows_dropped"].values())
        assert r["reconciles"], f"data report does not reconcile for {t}: {r}"


def _counts(df: pl.DataFrame, column: str) -> dict[str, int]:
    """Rows per value of `column`, keyed and sorted by the value as a string (null: 'None')."""
    return {
        str(k): int(v)
        for k, v in sorted(df.group_by(column).len().iter_rows(), key=lambda kv: str(kv[0]))
    }


def headline_metrics(report: dict) -> dict[str, float | int]:
    """The dozen numbers of the data report that `dvc metrics show` lists (metrics.json); the
    rest stays in report.json."""
    tables = [report[t] for t in ("behaviors", "labels", "impressions")]
    windows = report["impressions"].get("windows", {})
    dropped = [(r, n) for t in tables for r, n in t["rows_dropped"].items()]
    return {
        "users": report["behaviors"]["users"],
        "behaviors": report["behaviors"]["rows_kept"],
        "items": report["behaviors"]["items"],
        "labeled_users": report["labels"]["rows_kept"],
        "ctr_impressions": sum(windows.get(w, 0) for w in ("train", "valid", "test")),
        "ctr_test_click_rate": report["impressions"].get("click_rate", {}).get("test", 0.0),
        "pretrain_users": report["pretrain"]["users"],
        "duplicates_dropped": sum(n for r, n in dropped if r == DUPLICATE),
        "bad_rows_dropped": sum(n for r, n in dropped if r != DUPLICATE),
        "long_texts": sum(report[t].get("long_texts", 0) for t in ("behaviors", "impressions")),
        "demo_tasks": len(report["tasks"]["demo"]),
        "ctr_task": int(report["tasks"]["ctr"]),
    }
