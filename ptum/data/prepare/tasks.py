"""Which downstream tasks the prepared data allows, so that fine-tuning and export can skip the
others with a clear message instead of failing on empty tables.

    demo   the label columns that can be learned and measured: a value for at least one
           training and one test user, and at least 2 classes among the training users
    ctr    impressions in the CTR-train and CTR-test windows, with both clicks and non-clicks
           among the test ones (AUC needs both)

A source without labels or impressions (the original PTUM behavior.tsv, a generic directory
with behaviors only) still gets every output file, with its schema and no rows.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from ptum.data import verified

# labels.parquet columns that are not labels.
_NOT_LABELS = ("user_id", "split")


def tasks_of(labels: pl.DataFrame, impressions: pl.DataFrame) -> dict:
    """{"demo": [label columns], "ctr": bool, "why_not": {task: reason}} of labels.parquet and
    impressions.parquet as prepare writes them; why_not explains each task left out ("demo"
    when no label column is usable, "demo:<label>" for one label, "ctr")."""
    why_not: dict[str, str] = {}
    label_cols = [c for c in labels.columns if c not in _NOT_LABELS and not c.startswith("train_")]
    demo = []
    if not label_cols:
        why_not["demo"] = "no label columns (the source has no labels table)"
    for c in label_cols:
        train = labels.filter(pl.col("split") == "train")[c].drop_nulls()
        test = labels.filter(pl.col("split") == "test")[c].drop_nulls()
        if train.n_unique() < 2:
            why_not[f"demo:{c}"] = f"{train.n_unique()} class(es) among the training users"
        elif test.len() == 0:
            why_not[f"demo:{c}"] = "no test user has a value"
        else:
            demo.append(c)
    if label_cols and not demo:
        why_not["demo"] = "no label column is usable"
    windows = impressions.group_by("window").len()
    counts = dict(windows.iter_rows())
    test_clicks = impressions.filter(pl.col("window") == "test")["clicked"]
    if impressions.height == 0:
        why_not["ctr"] = "no impressions (the source has no impressions table, or it is empty)"
    elif not counts.get("train") or not counts.get("test"):
        why_not["ctr"] = "no impressions in the CTR-train or the CTR-test window"
    elif test_clicks.n_unique() < 2:
        why_not["ctr"] = "the CTR-test window has only clicks or only non-clicks"
    return {"demo": demo, "ctr": "ctr" not in why_not, "why_not": why_not}


def available_tasks(prepared_dir: Path) -> dict:
    """`tasks_of` the outputs of `prepare` in `prepared_dir`: {"demo": [label columns],
    "ctr": bool, "why_not": {task: reason}}, read from the files themselves (checked against
    the manifest of `prepared_dir`)."""
    prepared_dir = Path(prepared_dir)
    labels, impressions = (
        verified.read_parquet(prepared_dir / f"{name}.parquet", "prepare")
        for name in ("labels", "impressions")
    )
    return tasks_of(labels, impressions)


def why_unavailable(task: str, prepared_dir: Path) -> str | None:
    """None when the prepared data allows `task` (demo | ctr), else the reason it does not
    (for Demo: why no label column is usable, each unusable column's reason joined)."""
    tasks = available_tasks(prepared_dir)
    if tasks[task]:
        return None
    why = tasks["why_not"]
    if task == "ctr" or "demo" in why and not any(k.startswith("demo:") for k in why):
        return str(why[task])
    return "; ".join(f"{k.removeprefix('demo:')}: {v}" for k, v in why.items() if k != "ctr")
