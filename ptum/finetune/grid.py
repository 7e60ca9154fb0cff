"""The fine-tuning grid of one task: cells in parallel processes, cached, summarised, tested.

A cell = (task, label, model, mode, ratio, seed). Its result is cached under `cache_dir` keyed by
everything it depends on (cell, options, checkpoint hash, data hash), so a rerun of the stage only
computes the cells whose inputs changed; pre-training is shared by all ratios and seeds of an
architecture, and `frozen` cells compute the fixed user vectors once per cell.

The summary holds, per (label, model, mode, ratio), mean ± std over seeds of every test metric,
and per (label, model, ratio) a paired comparison of finetune (and frozen) vs scratch across
seeds (paired t-test and Wilcoxon signed-rank p-values), plus the simple baselines computed on the
same splits: majority class (Demo); candidate click rate and user-candidate token overlap (CTR).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from scipy import stats

from ptum import checkpoint
from ptum.finetune.metrics import accuracy, average_precision, macro_f1, roc_auc
from ptum.finetune.train import CellOptions, CtrData, run_ctr, run_demo
from ptum.pretrain.data import file_digest, load_corpus, tokenizer_digest


@dataclass(frozen=True)
class Cell:
    task: str  # demo | ctr
    label: str  # demo label column; "click" for ctr
    model: str
    mode: str
    ratio: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.task}/{self.label}/{self.model}/{self.mode}/{round(self.ratio * 100)}/{self.seed}"


# ---------------------------------------------------------------- data


def ratio_column(r: float) -> str:
    return f"train_{round(r * 100)}"


@dataclass
class DemoTask:
    corpus: object
    labels: dict[str, tuple[np.ndarray, list[str]]]  # label -> (class index per row, classes)
    split: np.ndarray
    subsets: dict[float, np.ndarray]  # ratio -> bool per row


def load_demo(prepared: Path, tokenized: Path, max_len: int, ratios: list[float]) -> DemoTask:
    labels = pl.read_parquet(prepared / "labels.parquet").sort("user_id")
    report = json.loads((prepared / "report.json").read_text())
    cols = report["labels"].get("label_columns", [])
    corpus = load_corpus(
        prepared, tokenized, "", max_len, view="full", users=labels["user_id"].to_list()
    )
    out = {}
    for c in cols:
        classes = sorted(labels[c].drop_nulls().unique().to_list())
        index = {v: i for i, v in enumerate(classes)}
        out[c] = (np.array([index.get(v, -1) if v is not None else -1 for v in labels[c]]), classes)
    subsets = {r: labels[ratio_column(r)].to_numpy() for r in ratios}
    return DemoTask(corpus, out, labels["split"].to_numpy(), subsets)


@dataclass
class CtrTask:
    data: CtrData
    subsets: dict[float, np.ndarray]


def load_ctr(prepared: Path, tokenized: Path, max_len: int, ratios: list[float]) -> CtrTask:
    imps = pl.read_parquet(prepared / "impressions.parquet")
    is_test = imps["window"] == "test"
    train_users = imps.filter(~is_test)["user_id"].unique().sort().to_list()
    test_users = imps.filter(is_test)["user_id"].unique().sort().to_list()
    hist_train = load_corpus(
        prepared, tokenized, "", max_len, view="before_train", users=train_users
    )
    hist_test = load_corpus(prepared, tokenized, "", max_len, view="before_test", users=test_users)
    tr = {u: i for i, u in enumerate(train_users)}
    te = {u: i for i, u in enumerate(test_users)}
    row = np.array(
        [te[u] if t else tr[u] for u, t in zip(imps["user_id"], is_test)], dtype=np.int64
    )
    data = CtrData(
        hist_train,
        hist_test,
        row,
        imps["item_id"].to_numpy().astype(np.int64),
        imps["clicked"].to_numpy().astype(np.int64),
        imps["window"].to_numpy(),
    )
    return CtrTask(data, {r: imps[ratio_column(r)].to_numpy() for r in ratios})


def _code_digest() -> str:
    """Hash of the code a cell's result depends on, so a code change never reuses old cells."""
    import ptum.finetune.metrics
    import ptum.finetune.train
    import ptum.heads
    import ptum.models
    import ptum.pretrain.data
    import ptum.pretrain.tasks

    files = [
        Path(m.__file__)
        for m in (
            ptum.finetune.train,
            ptum.finetune.metrics,
            ptum.heads,
            ptum.pretrain.data,
            ptum.pretrain.tasks,
        )
    ]
    files += sorted(Path(ptum.models.__file__).parent.glob("*.py"))
    return file_digest(files)


# ---------------------------------------------------------------- baselines


def demo_baselines(task: DemoTask, ratios: list[float]) -> list[dict]:
    out = []
    for label, (y, classes) in task.labels.items():
        test = (task.split == "test") & (y >= 0)
        for r in ratios:
            train = task.subsets[r] & (y >= 0)
            majority = np.bincount(y[train], minlength=len(classes)).argmax()
            pred = np.full(test.sum(), majority)
            out.append(
                {
                    "label": label,
                    "baseline": "majority",
                    "ratio": r,
                    "acc": accuracy(y[test], pred),
                    "macro_f1": macro_f1(y[test], pred, len(classes)),
                }
            )
    return out


def ctr_baselines(task: CtrTask, ratios: list[float]) -> list[dict]:
    d = task.data
    test = np.flatnonzero(d.window == "test")
    tokens = d.hist_test.tokens.numpy()
    out = []
    for r in ratios:
        train = task.subsets[r]
        clicks = np.bincount(d.item[train], weights=d.clicked[train], minlength=len(tokens))
        shown = np.bincount(d.item[train], minlength=len(tokens))
        prior, a = d.clicked[train].mean(), 10.0
        rate = (clicks + a * prior) / (shown + a)
        s = rate[d.item[test]]
        out.append(
            {
                "label": "click",
                "baseline": "item click rate",
                "ratio": r,
                "auc": roc_auc(d.clicked[test], s),
                "ap": average_precision(d.clicked[test], s),
            }
        )
    # Token overlap needs no training labels: share of the candidate's tokens that occur in the
    # user's history titles (a topic/genre-match proxy).
    s = np.zeros(len(test))
    hist = d.hist_test
    for j, i in enumerate(test):
        u = d.row[i]
        seen = np.unique(tokens[hist.items[u, : hist.lengths[u]]])
        cand = tokens[d.item[i]]
        cand = cand[cand != 0]
        s[j] = np.isin(cand, seen).mean() if len(cand) else 0.0
    for r in ratios:
        out.append(
            {
                "label": "click",
                "baseline": "token overlap",
                "ratio": r,
                "auc": roc_auc(d.clicked[test], s),
                "ap": average_precision(d.clicked[test], s),
            }
        )
    return out


# ---------------------------------------------------------------- workers

_STATE: dict = {}


def _init_worker(
    task: str,
    prepared: str,
    tokenized: str,
    max_len: int,
    ratios: list[float],
    ckpt_dirs: dict[str, str],
    threads: int,
) -> None:
    torch.set_num_threads(threads)
    loader = load_demo if task == "demo" else load_ctr
    _STATE["task"] = loader(Path(prepared), Path(tokenized), max_len, ratios)
    _STATE["models"] = {m: checkpoint.load(Path(d)).model for m, d in ckpt_dirs.items()}


def _run_cell(cell: Cell, opts: CellOptions, demo_select: str) -> dict:
    t0 = time.perf_counter()
    task = _STATE["task"]
    model = _STATE["models"][cell.model]
    if cell.task == "demo":
        y, classes = task.labels[cell.label]
        train_rows = np.flatnonzero(task.subsets[cell.ratio] & (y >= 0))
        res = run_demo(
            pretrained=model,
            corpus=task.corpus,
            y=y,
            split=task.split,
            train_rows=train_rows,
            n_classes=len(classes),
            mode=cell.mode,
            seed=cell.seed,
            opts=opts,
            select=demo_select,
        )
    else:
        train_idx = np.flatnonzero(task.subsets[cell.ratio])
        res = run_ctr(
            pretrained=model,
            data=task.data,
            train_idx=train_idx,
            mode=cell.mode,
            seed=cell.seed,
            opts=opts,
        )
    return {**asdict(cell), **res, "seconds": round(time.perf_counter() - t0, 2)}


def _progress(done: int, total: int, t0: float, cached: int) -> None:
    elapsed = time.perf_counter() - t0
    rate = (done - cached) / elapsed if elapsed > 0 and done > cached else 0.0
    eta = (total - done) / rate if rate else float("nan")
    bar = "#" * int(30 * done / max(total, 1))
    print(
        f"\r[{bar:<30}] {done}/{total} cells ({cached} cached), "
        f"{elapsed:.0f}s elapsed, ETA {eta:.0f}s",
        end="",
        file=sys.stderr,
        flush=True,
    )


def run_grid(
    *,
    task: str,
    labels: list[str] | None,
    models: list[str],
    modes: list[str],
    ratios: list[float],
    repeats: int,
    seed: int,
    opts: CellOptions,
    demo_select: str,
    prepared: Path,
    tokenized: Path,
    max_len: int,
    ckpt_root: Path,
    cache_dir: Path,
    workers: int,
) -> list[dict]:
    """Run (or fetch from cache) every cell of one task; returns the cell results."""
    if labels is None:
        report = json.loads((prepared / "report.json").read_text())
        labels = report["labels"].get("label_columns", []) if task == "demo" else ["click"]
    ckpts = {m: ckpt_root / m for m in models}
    tok_hash = tokenizer_digest(tokenized)
    hashes = {}
    for m, d in ckpts.items():
        meta = checkpoint.read_meta(d)
        if meta.get("tokenizer_sha256") != tok_hash:
            raise checkpoint.CheckpointMismatch(
                f"{d}: pre-trained with another tokenizer than {tokenized}; re-run pretrain"
            )
        if meta.get("architecture") != m:
            raise checkpoint.CheckpointMismatch(f"{d}: holds {meta.get('architecture')}, not {m}")
        hashes[m] = meta["model_sha256"]
    data_hash = file_digest(
        [prepared / f for f in ("labels.parquet", "impressions.parquet", "sequences.parquet")]
    )
    code_hash = _code_digest()
    cells = [
        Cell(task, lab, m, mode, r, seed + k)
        for lab in labels
        for m in models
        for mode in modes
        for r in ratios
        for k in range(repeats)
    ]

    def key(c: Cell) -> str:
        blob = json.dumps(
            [asdict(c), asdict(opts), demo_select, hashes[c.model], data_hash, code_hash],
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    cache_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    todo = []
    for c in cells:
        f = cache_dir / f"{key(c)}.json"
        if f.exists():
            results[c.name] = json.loads(f.read_text())
        else:
            todo.append(c)
    t0, cached = time.perf_counter(), len(results)
    _progress(len(results), len(cells), t0, cached)
    init = (
        task,
        str(prepared),
        str(tokenized),
        max_len,
        ratios,
        {m: str(d) for m, d in ckpts.items()},
        1 if workers > 1 else (os.cpu_count() or 1),
    )

    def store(c: Cell, res: dict) -> None:
        tmp = cache_dir / f"{key(c)}.json.tmp"
        tmp.write_text(json.dumps(res, sort_keys=True))
        tmp.replace(cache_dir / f"{key(c)}.json")
        results[c.name] = res
        _progress(len(results), len(cells), t0, cached)

    if todo and workers > 1:
        # spawn, not fork: a fork after torch has run (e.g. pre-training in this process) can
        # deadlock the child on OpenMP's thread pool.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            max_workers=workers, initializer=_init_worker, initargs=init, mp_context=ctx
        ) as pool:
            futures = {pool.submit(_run_cell, c, opts, demo_select): c for c in todo}
            for f in as_completed(futures):
                store(futures[f], f.result())
    elif todo:
        _init_worker(*init)
        for c in todo:
            store(c, _run_cell(c, opts, demo_select))
    print(file=sys.stderr)
    return [results[c.name] for c in cells]


# ---------------------------------------------------------------- summary


def summarize(cells: list[dict], metrics: list[str], primary: str) -> dict:
    """Mean ± std per (label, model, mode, ratio) and paired tests vs scratch per (label, model,
    ratio), pairing runs by seed."""
    df = pl.DataFrame(
        [
            {
                **{k: c[k] for k in ("label", "model", "mode", "ratio", "seed")},
                **{m: c["test"][m] for m in metrics},
            }
            for c in cells
        ]
    )
    rows = []
    for key, g in df.group_by(["label", "model", "mode", "ratio"], maintain_order=True):
        row = dict(zip(["label", "model", "mode", "ratio"], key))
        row["n"] = g.height
        for m in metrics:
            row[f"{m}_mean"] = float(g[m].mean())
            row[f"{m}_std"] = float(g[m].std()) if g.height > 1 else 0.0
        rows.append(row)
    tests = []
    for key, g in df.group_by(["label", "model", "ratio"], maintain_order=True):
        base = g.filter(pl.col("mode") == "scratch").sort("seed")
        for mode in ("finetune", "frozen"):
            other = g.filter(pl.col("mode") == mode).sort("seed")
            if base.height < 2 or other.height != base.height:
                continue
            a, b = other[primary].to_numpy(), base[primary].to_numpy()
            d = a - b
            # A paired t-test is undefined when every difference is equal (zero variance).
            t_p = float(stats.ttest_rel(a, b).pvalue) if d.std() > 0 else float("nan")
            w_p = float(stats.wilcoxon(a, b).pvalue) if np.any(d != 0) else 1.0
            tests.append(
                {
                    "label": key[0],
                    "model": key[1],
                    "ratio": key[2],
                    "comparison": f"{mode} - scratch",
                    "metric": primary,
                    "mean_diff": float(d.mean()),
                    "wins": int((d > 0).sum()),
                    "n": len(d),
                    "p_ttest": t_p,
                    "p_wilcoxon": w_p,
                }
            )
    return {"cells": rows, "tests": tests}
