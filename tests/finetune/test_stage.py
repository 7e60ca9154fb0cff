"""Stage finetune@TASK end to end on the tiny data: outputs, predictions that recompute the
reported metrics, and the CTR heads."""

import json

import numpy as np
import polars as pl
import pytest
import torch

from ptum import checkpoint
from ptum.config import FinetuneConfig
from ptum.data.corpus import tokenizer_digest
from ptum.finetune.cells import SplitSpec
from ptum.finetune.metrics import accuracy, macro_f1, roc_auc
from ptum.finetune.stage import run_stage
from ptum.heads import BiasedCtrHead, log_popularity
from ptum.models.user_model import ModelConfig, UserModel


@pytest.fixture(scope="module")
def ckpts(tiny_pipeline, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    tokens = np.load(tiny_pipeline / "tokenized" / "tokens.npy")
    for arch in ("hsa", "nativectr"):
        torch.manual_seed(0)
        config = ModelConfig.for_architecture(
            arch,
            vocab_size=int(tokens.max()) + 1,
            max_tokens=tokens.shape[1],
            max_behaviors=20,
            word_dim=8,
            dim=8,
            heads=2,
            head_dim=4,
            attn_hidden=8,
            dropout=0.0,
        )
        meta = {
            "architecture": arch,
            "tokenizer_sha256": tokenizer_digest(tiny_pipeline / "tokenized"),
            "model_config": config.to_dict(),
        }
        checkpoint.save(root / arch, UserModel(config=config), meta)
    return root


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
def test_stage_writes_predictions_that_recompute_every_run(tiny_pipeline, ckpts, tmp_path, task):
    out = tmp_path / "reports" / f"{task}.json"
    run_stage(
        CFG,
        task,
        prepared=tiny_pipeline / "prepared",
        tokenized=tiny_pipeline / "tokenized",
        max_behaviors=20,
        split=SplitSpec(),
        ckpt_root=ckpts,
        cache_dir=tmp_path / "cache",
        out=out,
    )
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


def test_biased_head_starts_as_the_dot_product_and_falls_back_to_popularity():
    torch.manual_seed(0)
    head = BiasedCtrHead(dim=4, num_items=5, num_users=3)
    u, c = torch.randn(3, 4), torch.randn(3, 4)
    ids, users = torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2])
    pop = torch.from_numpy(log_popularity(np.array([0, 10, 1, 0, 0, 0])).astype(np.float32))
    assert torch.allclose(head.logits(u, c, users, ids, pop[ids]), (u * c).sum(-1))
    opt = torch.optim.AdamW(head.parameters(), lr=0.1, weight_decay=0.01)
    for _ in range(20):  # item 1 is clicked, item 2 is not; item 3 is never shown
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            head.logits(u[:2], c[:2], users[:2], ids[:2], pop[ids[:2]]), torch.tensor([1.0, 0.0])
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    b = head.item_bias.weight.squeeze(-1).detach()
    assert b[1] > 0 > b[2]
    assert b[3] == 0 and b[0] == 0  # no training impression: bias = a * log popularity only
    assert head.pop_weight.item() != 0
    ub = head.user_bias.weight.squeeze(-1).detach()
    assert ub[0] > 0 > ub[1] and ub[2] == 0  # user 2 had no impression: the vector term only


def test_an_edited_cache_entry_is_refused_by_name(tiny_pipeline, ckpts, tmp_path):
    from ptum.finetune.cache import CacheEntryCorrupt

    kw = dict(
        prepared=tiny_pipeline / "prepared",
        tokenized=tiny_pipeline / "tokenized",
        max_behaviors=20,
        split=SplitSpec(),
        ckpt_root=ckpts,
        cache_dir=tmp_path / "cache",
        out=tmp_path / "demo.json",
    )
    cfg = FinetuneConfig(
        demo_models=("hsa",),
        modes=("scratch",),
        ratios=(1.0,),
        repeats=1,
        max_epochs=1,
        head_hidden=8,
        workers=1,
        bootstrap=100,
    )
    run_stage(cfg, "demo", **kw)
    entry = sorted((tmp_path / "cache").glob("*.json"))[-1]
    text = entry.read_text()
    entry.write_text(text.replace('"acc": ', '"acc": 0.99, "was": ', 1))
    with pytest.raises(CacheEntryCorrupt, match=entry.name):
        run_stage(cfg, "demo", **kw)
    entry.write_text(text)  # restored: accepted again
    run_stage(cfg, "demo", **kw)


def test_pool_workers_die_with_a_killed_parent(tiny_pipeline, ckpts, tmp_path):
    """SIGKILL the process running a 2-worker grid: no worker survives it."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    script = f"""
import sys
from pathlib import Path
from ptum.config import FinetuneConfig
from ptum.finetune.grid import SplitSpec
from ptum.finetune.stage import run_stage
cfg = FinetuneConfig(demo_models=("hsa",), modes=("scratch", "finetune"), ratios=(1.0,),
                     repeats=8, max_epochs=50, patience=50, head_hidden=8, workers=2)
run_stage(cfg, "demo", prepared=Path({str(tiny_pipeline / "prepared")!r}),
          tokenized=Path({str(tiny_pipeline / "tokenized")!r}), max_behaviors=20,
          split=SplitSpec(), ckpt_root=Path({str(ckpts)!r}), cache_dir=Path({str(tmp_path)!r}),
          out=Path({str(tmp_path / "o.json")!r}))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen([sys.executable, "-c", script], env=env)

    def children() -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(parent.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    deadline = time.time() + 60
    while len(children()) < 2 and time.time() < deadline:  # the pool's workers (+ tracker)
        time.sleep(0.2)
    workers = children()
    assert len(workers) >= 2
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()

    def running(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
        except OSError:  # gone (and reaped)
            return False

    # A worker killed while it still imports torch notices only when its start-up ends (it
    # then finds its parent gone): on a slow machine that takes seconds, hence the deadline.
    deadline = time.time() + 90
    alive = workers
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = [p for p in workers if running(p)]
    assert alive == [], f"orphaned workers {alive}"


@pytest.mark.parametrize("task", ["demo", "ctr"])
def test_a_task_the_data_does_not_allow_is_reported_not_run(behaviors_only, task, tmp_path):
    out = tmp_path / "reports" / f"{task}.json"
    summary = run_stage(
        CFG,
        task,
        prepared=behaviors_only / "prepared",
        tokenized=behaviors_only / "missing",  # never read: nothing is run
        max_behaviors=4,
        split=SplitSpec(),
        ckpt_root=behaviors_only / "missing",
        cache_dir=tmp_path / "cache",
        out=out,
    )
    why = "no label columns" if task == "demo" else "no impressions"
    assert summary["available"] is False and summary["why_not"].startswith(why)
    assert json.loads(out.with_name(f"{task}_metrics.json").read_text()) == summary
    result = json.loads(out.read_text())
    assert result["available"] is False and result["runs"] == result["versus_baselines"] == []
    preds = pl.read_parquet(out.with_name(f"{task}_predictions.parquet"))
    assert preds.height == 0
    assert preds.columns[-1] == ("pred" if task == "demo" else "score")
    assert (tmp_path / "cache").is_dir() and not list((tmp_path / "cache").iterdir())
