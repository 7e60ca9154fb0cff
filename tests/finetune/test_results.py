"""A task's grid run and written end to end on the tiny data: outputs, predictions that
recompute the reported metrics, and a task the data does not allow."""

import json

import polars as pl
import pytest

from ptum.config import FinetuneConfig
from ptum.finetune.metrics import accuracy, macro_f1, roc_auc
from ptum.finetune.results import run_task
from ptum.stages.finetune import grid_axes, grid_options
from tests.finetune.conftest import SPLIT

CFG = FinetuneConfig(
    demo_models=("hsa",),
    ctr_models=("nativectr",),
    modes=("scratch", "finetune"),
    ratios=(0.5, 1.0),
    repeats=2,
    max_epochs=2,
    head_hidden=8,
    workers=1,
    bootstrap=200,
)


@pytest.mark.parametrize("task", ["demo", "ctr"])
def test_run_task_writes_predictions_that_recompute_every_run(options, tmp_path, task):
    out = tmp_path / "reports" / f"{task}.json"
    run_task(grid_axes(CFG, task), options(CFG), bootstrap=CFG.bootstrap, out=out)
    res = json.loads(out.read_text())
    preds = pl.read_parquet(tmp_path / "reports" / f"{task}_predictions.parquet")
    methods = {(r["model"], r["mode"]) for r in res["runs"]}
    assert ("baseline" in {m for _, m in methods}) and len(methods) >= 4
    assert len(res["runs"]) == len(methods) * 2 * 2 * (2 if task == "demo" else 1)
    for r in res["runs"]:
        p = preds.filter(
            (pl.col("label") == r["label"])
            & (pl.col("model") == r["model"])
            & (pl.col("mode") == r["mode"])
            & (pl.col("ratio") == r["ratio"])
            & (pl.col("seed") == r["seed"])
        )
        assert p.height == r["n_test"] > 0
        if task == "demo":
            assert accuracy(p["y"], p["pred"]) == pytest.approx(r["test"]["acc"])
            # Classes absent from both y and pred add nothing to macro-F1, so the largest
            # class seen is enough to recompute it.
            k = int(max(p["y"].max(), p["pred"].max())) + 1
            assert macro_f1(p["y"], p["pred"], k) == pytest.approx(r["test"]["macro_f1"])
        else:
            assert roc_auc(p["y"], p["score"]) == pytest.approx(r["test"]["auc"], nan_ok=True)
    # The same test users within a repeat for every method; other users in another repeat.
    users = {
        (r["model"], r["mode"], r["seed"]): set(
            preds.filter(
                (pl.col("model") == r["model"])
                & (pl.col("mode") == r["mode"])
                & (pl.col("seed") == r["seed"])
            )["user_id"]
        )
        for r in res["runs"]
    }
    for (_, _, seed), u in users.items():
        assert u == users[next(k for k in users if k[2] == seed)]
    if task == "demo":
        assert users[("hsa", "scratch", 100)] != users[("hsa", "scratch", 101)]
        assert {r["chosen"]["class_weight"] for r in res["runs"] if r["mode"] != "baseline"} <= {
            "none",
            "balanced",
        }
    metrics = json.loads((tmp_path / "reports" / f"{task}_metrics.json").read_text())
    assert "claims" in metrics and len(json.dumps(metrics)) < 2000


@pytest.mark.parametrize("task", ["demo", "ctr"])
def test_a_task_the_data_does_not_allow_is_reported_not_run(behaviors_only, task, tmp_path):
    out = tmp_path / "reports" / f"{task}.json"
    missing = behaviors_only / "missing"  # never read: nothing is run
    options = grid_options(
        CFG,
        split=SPLIT,
        prepared=behaviors_only / "prepared",
        tokenized=missing,
        max_behaviors=4,
        ckpt_root=missing,
        cache_dir=tmp_path / "cache",
    )
    summary = run_task(grid_axes(CFG, task), options, bootstrap=CFG.bootstrap, out=out)
    why = "no label columns" if task == "demo" else "no impressions"
    assert summary["available"] is False and summary["why_not"].startswith(why)
    assert json.loads(out.with_name(f"{task}_metrics.json").read_text()) == summary
    result = json.loads(out.read_text())
    assert result["available"] is False and result["runs"] == result["versus_baselines"] == []
    preds = pl.read_parquet(out.with_name(f"{task}_predictions.parquet"))
    assert preds.height == 0
    assert preds.columns[-1] == ("pred" if task == "demo" else "score")
    assert (tmp_path / "cache").is_dir() and not list((tmp_path / "cache").iterdir())
