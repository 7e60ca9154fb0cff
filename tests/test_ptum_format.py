"""The paper's own data layout end to end: a PTUM `behavior.tsv` (behaviors only, no labels and
no impressions) goes through `dvc repro` to the end. Pre-training, export and `ptum embed` work;
the fine-tuning, sensitivity and tuning stages succeed and say that Demo and CTR are not
available and why; the report, and what a Prefect run publishes of it, say so too.

The project is a throw-away git + DVC repository made here with the root dvc.yaml, the ptum
package and params.yaml at the quick preset's sizes (every stage in seconds).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

from flows.artifacts import flatten_metrics
from ptum.config.overrides import apply_overrides
from ptum.presets import QUICK
from tests.conftest import write_ptum_tsv

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
USERS = 120


def _project(dest: Path) -> Path:
    dest.mkdir()
    shutil.copytree(ROOT / "ptum", dest / "ptum", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", dest / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    apply_overrides(
        params,
        [
            *QUICK,
            "data.source=ptum_tsv",
            "data.path=behavior.tsv",
            "tune.n_trials=1",
            "tune.prune_startup_trials=0",
            "export.heads=true",
        ],
        set(params),
    )
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    write_ptum_tsv(dest / "behavior.tsv", users=USERS, seed=0)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=dest, check=True)
    return dest


@pytest.fixture(scope="module")
def repro(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    proj = _project(tmp_path_factory.mktemp("ptum_format") / "proj")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PTUM_DEBUG", None)
    run = subprocess.run(
        [sys.executable, "-m", "dvc", "repro"],
        cwd=proj,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return proj, run


def test_dvc_repro_runs_to_the_end(repro):
    proj, run = repro
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"],
        cwd=proj,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(status.stdout) == {}
    report = json.loads((proj / "data/prepared/report.json").read_text())
    assert report["behaviors"]["users"] == USERS


@pytest.mark.parametrize("task", ["demo", "ctr"])
def test_finetune_says_the_task_is_not_available_and_why(repro, task):
    proj, _ = repro
    why = {
        "demo": "no label columns (the source has no labels table)",
        "ctr": "no impressions (the source has no impressions table, or it is empty)",
    }[task]
    metrics = json.loads((proj / f"reports/finetune/{task}_metrics.json").read_text())
    assert metrics == {"task": task, "available": False, "why_not": why}
    result = json.loads((proj / f"reports/finetune/{task}.json").read_text())
    assert result["available"] is False and result["runs"] == [] and result["claims"] == []
    preds = pl.read_parquet(proj / f"reports/finetune/{task}_predictions.parquet")
    assert preds.height == 0 and "user_id" in preds.columns
    results_md = (proj / "reports/results.md").read_text()
    assert f"Not available on this data: {why}." in results_md


def test_the_published_metrics_say_the_tasks_were_not_available(repro):
    """The rows of a flow run's `ptum-metrics` artifact, made from `dvc metrics show` as
    flows.pipeline.publish makes them (tests/flows/test_pipeline.py runs the Prefect side)."""
    from dvc.repo import Repo

    proj, _ = repro
    with Repo(str(proj)) as repo:
        rows = flatten_metrics(repo.metrics.show())
    shown = {(r["file"], r["metric"]): r["value"] for r in rows}
    for task in ("demo", "ctr"):
        assert shown[(f"reports/finetune/{task}_metrics.json", "available")] is False, shown
    assert not [r for r in rows if r["metric"] == "error"], rows


def test_sensitivity_and_tune_say_nothing_was_available(repro):
    proj, _ = repro
    sens = json.loads((proj / "reports/sensitivity.json").read_text())
    assert sens["demo"]["available"] is False and sens["demo"]["experiments"] == {}
    assert not list((proj / "models/sensitivity").iterdir())  # no variant pre-trained
    best = json.loads((proj / "reports/tune/best_params.json").read_text())
    assert best["available"] is False and "no label columns" in best["why_not"]


def test_pretraining_export_and_embed_work(repro):
    proj, run = repro
    metrics = json.loads((proj / "reports/pretrain/hsa/metrics.json").read_text())
    assert metrics["valid_mbp_acc"] > metrics["chance_acc"]
    export = json.loads((proj / "models/onnx/hsa/export.json").read_text())
    assert "user_model.onnx" in export["files"]
    assert not any(n.startswith("demo_") for n in export["files"])  # no labels, no Demo head
    assert "export: no demographic heads" in run.stdout + run.stderr
    out = proj / "emb.parquet"
    embed = subprocess.run(
        [sys.executable, "-m", "ptum", "embed", "--arch", "hsa", "--out", str(out)],
        cwd=proj,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
    )
    assert embed.returncode == 0, embed.stderr[-3000:]
    vectors = pl.read_parquet(out)
    assert vectors.height == USERS
