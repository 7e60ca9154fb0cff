"""Benchmark: training speed of every model, this code vs an earlier revision, in one run.

    python benchmarks/pipeline.py                       # vs 519ec8f (before the speed work)
    python benchmarks/pipeline.py --before REV --models hsa,nativectr --epochs 6 --seeds 2

For each model and each code version (a `git worktree` of --before, and this checkout), on the
same prepared data (the workspace's data/prepared and data/tokenized, i.e. the default `dvc
repro` data) and the same seeds, one child process at a time:
  - pre-training: `ptum pretrain` for --epochs epochs with that version's own params.yaml and CLI;
    prints its mean users/s and the held-out MBP / NBP accuracy after the last epoch;
  - fine-tuning: one cell of the model's task (Demo: gender; CTR), "finetune" mode, 100% of the
    labels, with that version's params.yaml finetune options except exactly --cell-epochs
    epochs (no early stop), from the checkpoint just trained; prints its seconds.
Everything runs with one torch thread (the default's deterministic pre-training; fine-tuning
runs one thread per worker process). Do not run anything else meanwhile, and quote the machine
and its load with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODELS = ("han", "hura", "hsa")
CTR_MODELS = ("gru4rec", "nativectr", "bert4rec")

# One fine-tuning cell, timed, with the finetune options of the version's own params.yaml (as
# `dvc repro` runs them) and two stated overrides: exactly `epochs` epochs (no early stop). Runs
# in both versions: earlier ones built the options in ptum.finetune.stage and returned a dict.
CELL = r"""
import json, sys, time
from dataclasses import replace
from pathlib import Path
import torch
torch.set_num_threads(1)
from ptum import checkpoint
from ptum.config import load_params
from ptum.finetune.data import load_demo, load_ctr
try:
    from ptum.finetune.ctr import run_ctr
    from ptum.finetune.demo import run_demo
except ImportError:
    from ptum.finetune.train import run_demo, run_ctr
try:
    from ptum.stages.finetune import cell_options
except ImportError:
    from ptum.finetune.stage import cell_options
a = json.loads(sys.argv[1])
data = Path(a["data"])
model = checkpoint.load(Path(a["ckpt"])).model
p = load_params(Path("params.yaml"))
opts = replace(cell_options(p.finetune), max_epochs=a["epochs"], patience=a["epochs"] + 1)
ratios = list(p.finetune.ratios)
if a["task"] == "demo":
    t = load_demo(data / "prepared", data / "tokenized", a["max_len"], ratios)
    t = t.resplit(p.finetune.seed, tuple(p.prepare.demo_split))
    y, classes = t.labels["gender"]
    rows = (t.subsets[1.0] & (y >= 0)).nonzero()[0]
    t0 = time.perf_counter()
    r = run_demo(pretrained=model, corpus=t.corpus, y=y, split=t.split, train_rows=rows,
                 n_classes=len(classes), mode="finetune", seed=p.finetune.seed, opts=opts,
                 select=p.finetune.demo_select)
else:
    t = load_ctr(data / "prepared", data / "tokenized", a["max_len"], ratios)
    t = t.resplit(p.finetune.seed, p.prepare.ctr_valid_frac)
    t0 = time.perf_counter()
    r = run_ctr(pretrained=model, data=t.data, train_idx=t.subsets[1.0].nonzero()[0],
                mode="finetune", seed=p.finetune.seed, opts=opts)
seconds = time.perf_counter() - t0
r = getattr(r, "result", r)  # a CellRun in this version, a dict before
print(json.dumps({"seconds": seconds, "epochs": r["epochs"], "valid": r["valid"]}))
"""


def _tree(rev: str, keep: Path) -> Path:
    """A detached worktree of `rev` (reused if present)."""
    path = keep / f"tree-{rev}"
    if not path.exists():
        subprocess.run(
            ["git", "worktree", "add", "--detach", "-f", str(path), rev],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
    return path


def _project(tree: Path, work: Path, epochs: int, seed: int) -> Path:
    """A run directory: the tree's own params.yaml (epochs/seed set) and the shared data."""
    work.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((tree / "params.yaml").read_text())
    params["pretrain"].update({"epochs": epochs, "seed": seed})
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    (work / "data").mkdir(exist_ok=True)
    for sub in ("prepared", "tokenized"):
        link = work / "data" / sub
        if not link.exists():
            link.symlink_to(ROOT / "data" / sub)
    return work


def _env(tree: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def pretrain(tree: Path, work: Path, arch: str) -> dict:
    out = work / "models" / arch
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "ptum", "pretrain", "--arch", arch, "--out", str(out)],
        cwd=work,
        env=_env(tree),
        check=True,
        capture_output=True,
    )
    wall = time.perf_counter() - t0
    hist = json.loads((out / "reports" / "history.json").read_text())
    last = hist[-1]
    return {
        "users_per_s": sum(h["users_per_s"] for h in hist) / len(hist),
        "wall_s": wall,
        "mbp_acc": last.get("valid_mbp_acc"),
        "nbp_acc": last.get("valid_nbp_acc"),
        "ckpt": str(out),
    }


def cell(tree: Path, work: Path, arch: str, ckpt: str, epochs: int, max_len: int) -> dict:
    task = "demo" if arch in DEMO_MODELS else "ctr"
    arg = {
        "task": task,
        "ckpt": ckpt,
        "data": str(work / "data"),
        "epochs": epochs,
        "max_len": max_len,
    }
    p = subprocess.run(
        [sys.executable, "-c", CELL, json.dumps(arg)],
        cwd=work,
        env=_env(tree),
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", default="519ec8f", help="git revision to compare against")
    ap.add_argument("--models", default=",".join(DEMO_MODELS + CTR_MODELS))
    ap.add_argument("--epochs", type=int, default=2, help="pre-training epochs per run")
    ap.add_argument("--cell-epochs", type=int, default=3, help="fine-tuning epochs per cell")
    ap.add_argument("--seeds", type=int, default=1, help="pre-training seeds per model")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    if not (ROOT / "data" / "tokenized" / "tokens.npy").is_file():
        sys.exit("benchmarks/pipeline.py: no data/tokenized: run `dvc repro tokenize` first")
    max_len = yaml.safe_load((ROOT / "params.yaml").read_text())["prepare"]["max_behaviors"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="ptum-bench-") as tmp:
        keep = Path(tmp)
        trees = {"before": _tree(args.before, keep), "after": ROOT}
        try:
            for arch in args.models.split(","):
                for seed in range(42, 42 + args.seeds):
                    row: dict = {"model": arch, "seed": seed}
                    for name, tree in trees.items():
                        work = _project(tree, keep / f"{name}-{arch}-{seed}", args.epochs, seed)
                        pre = pretrain(tree, work, arch)
                        c = cell(tree, work, arch, pre["ckpt"], args.cell_epochs, max_len)
                        row[name] = {k: v for k, v in pre.items() if k != "ckpt"} | {
                            "cell_s": c["seconds"],
                            "cell_valid": c["valid"],
                        }
                    rows.append(row)
                    _print_row(row)
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(trees["before"])],
                cwd=ROOT,
                capture_output=True,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


def _print_row(row: dict) -> None:
    b, a = row["before"], row["after"]
    print(
        f"{row['model']:>9} seed {row['seed']}: pre-training users/s "
        f"{b['users_per_s']:7.1f} -> {a['users_per_s']:7.1f} "
        f"(x{a['users_per_s'] / b['users_per_s']:.2f}); held-out MBP acc "
        f"{b['mbp_acc']:.3f} -> {a['mbp_acc']:.3f}, NBP acc {b['nbp_acc']:.3f} -> "
        f"{a['nbp_acc']:.3f}; fine-tuning cell {b['cell_s']:6.1f} s -> {a['cell_s']:6.1f} s "
        f"(x{b['cell_s'] / a['cell_s']:.2f})",
        flush=True,
    )


if __name__ == "__main__":
    main()
