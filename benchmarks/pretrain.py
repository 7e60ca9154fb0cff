"""Benchmark: pre-training throughput, unique-item encoding vs naive per-behavior encoding, and
the hybrid behavior encoder (text + item id) vs text only.

    python benchmarks/pretrain.py [--movielens ../shared/data/movielens-100k] [--steps 6]
    python benchmarks/pretrain.py --gpu          # on a CUDA machine: users/s and TFLOP/s
    python benchmarks/pretrain.py --quick        # CPU-default sizes, small synthetic data only

For each data set, the same model (paper-sized HSA by default) and the same batches are timed
with (a) each distinct item of the batch encoded once and gathered, (b) every behavior and
candidate encoded separately, and (c) as (a) with the hybrid behavior encoder (the same
self-attention text encoder + an item-id embedding over the items seen >= 2 times, gated).
Each variant runs in its own child process so its peak memory (RSS on CPU, max allocated on GPU)
is its own. Training steps = forward + backward + AdamW step.

Options come from params.yaml (`load_params`): pretrain's mbp, nbp, k, lam, p, negatives, lr,
model sizes and id_min_count, prepare's max_behaviors and sections, tokenize's vocab_size and
max_tokens (also the synthetic case's token shapes). Stated overrides: the paper's model sizes
(word_dim 300, dim 256, heads 16 x 16, attn_hidden 200) unless --quick, --batch users per step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ptum.config import Params

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
from benchmarks.pretrain import build
from ptum.pretrain.data import make_batch, step_rng
from ptum.pretrain.tasks import ptum_step
from torch.utils.flop_counter import FlopCounterMode
args = json.loads(sys.argv[1])
torch.manual_seed(0)
torch.set_num_threads(args["threads"])
device = torch.device(args["device"])
model, corpus = build(args)
model = model.to(device)
tokens = corpus.tokens.to(device)
pre = args["pretrain"]
opt = torch.optim.AdamW(model.parameters(), lr=pre["lr"])
rows_all = np.flatnonzero(corpus.lengths >= 2)
def step(i, count=False):
    rows = rows_all[(i * args["batch"]) % len(rows_all):][: args["batch"]]
    b = make_batch(corpus, rows, step_rng(0, 0, i), k=pre["k"], p=pre["p"], negatives=pre["negatives"]).to(device)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    with ctx:
        out = ptum_step(model, tokens, b, use_mbp=pre["mbp"], use_nbp=pre["nbp"], lam=pre["lam"], unique=args["unique"])
    opt.zero_grad(); out["loss"].backward(); opt.step()
    return len(rows)
for i in range(args["warmup"]):
    step(i)
flops = 0
if args["count_flops"]:
    with FlopCounterMode(display=False) as fc:
        step(0)
    flops = fc.get_total_flops()
if device.type == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter(); users = 0
for i in range(args["steps"]):
    users += step(args["warmup"] + i)
if device.type == "cuda":
    torch.cuda.synchronize()
dt = time.perf_counter() - t0
peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
print(json.dumps({"users_per_s": users / dt, "step_s": dt / args["steps"], "peak_mib": peak,
                  "tflops": flops * args["steps"] / dt / 1e12 if flops else 0.0}))
"""


def build(args: dict):
    """The model and corpus of one benchmark case (called in the child process)."""
    import torch

    from ptum.data.corpus import Corpus, item_texts, load_corpus
    from ptum.models.id_vocab import build_id_vocab
    from ptum.models.user_model import ModelConfig, UserModel

    if args["data"] == "synthetic":
        rng = np.random.default_rng(0)
        n_users, n_items, L = args["synthetic"]
        T, V = args["max_tokens"], args["vocab_size"]
        lengths = np.full(n_users, L)
        # Zipf-popular items: behaviors repeat, as in real logs.
        w = 1 / np.arange(1, n_items + 1) ** 1.05
        items = rng.choice(np.arange(1, n_items + 1), size=(n_users, L), p=w / w.sum())
        tok_len = rng.integers(8, T + 1, size=n_items + 1)
        tokens = rng.integers(2, V, size=(n_items + 1, T))
        tokens[np.arange(T)[None, :] >= tok_len[:, None]] = 0
        tokens[0] = 0
        corpus = Corpus(
            [str(i) for i in range(n_users)],
            items.astype(np.int64),
            rng.integers(0, 10**6, size=(n_users, L)),
            lengths,
            torch.from_numpy(tokens.astype(np.int64)),
            items.ravel(),
        )
        vocab = V
        texts = [f"item {i}" for i in range(1, n_items + 1)]
    else:
        root = Path(args["data"])
        corpus = load_corpus(root / "prepared", root / "tokenized", "train", args["max_behaviors"])
        vocab = json.loads((root / "tokenized" / "report.json").read_text())["vocab_size"]
        texts = item_texts(root / "prepared")
    hybrid, id_vocab = {}, None
    if args["encoder"] == "hybrid":
        id_vocab = build_id_vocab(corpus.items, texts, corpus.tokens, args["id_min_count"])
        hybrid = dict(
            behavior_encoder="hybrid",
            num_items=corpus.num_items + 1,
            id_vocab=id_vocab.size,
        )
    config = ModelConfig.for_architecture(
        "hsa",
        vocab_size=vocab,
        max_tokens=corpus.tokens.shape[1],
        max_behaviors=args["max_behaviors"],
        **hybrid,
        **args["model"],
    )
    model = UserModel(config=config)
    if id_vocab is not None:
        model.behavior_encoder.set_id_index(id_vocab.id_index())
    return model, corpus


def prepare_movielens(src: Path, dest: Path, params: Params) -> None:
    """ingest (MovieLens from `src`), then the prepare and tokenize stages as the pipeline runs
    them (their params sections), into `dest`."""
    from ptum.data.ingest import ingest
    from ptum.stages import prepare, tokenize

    ingest(source="movielens", path=str(src), out_dir=dest / "raw")
    prepare.run(params, raw=dest / "raw", out=dest / "prepared")
    tokenize.run(params, prepared=dest / "prepared", out=dest / "tokenized")


def run_child(args: dict) -> dict:
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(args)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        cwd=root,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
# Stated override of pretrain.model: the paper's sizes (params.yaml's are CPU-sized; --quick).
PAPER = {
    "word_dim": 300,
    "dim": 256,
    "heads": 16,
    "head_dim": 16,
    "attn_hidden": 200,
    "dropout": 0.2,
    "layers": 2,
}


def _arguments() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog="Options: params.yaml, see the docstring."
    )
    ap.add_argument(
        "--movielens",
        type=Path,
        default=Path(__file__).resolve().parents[2] / "shared/data/movielens-100k",
    )
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--gpu", action="store_true", help="run on CUDA and report TFLOP/s")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="params.yaml's CPU-sized model (64-d) on 300 synthetic users x 50 behaviors",
    )
    return ap.parse_args()


def _child_args(params: Params, args: argparse.Namespace) -> dict:
    """What every child reads: params.yaml's options, the stated overrides, the run's sizes."""
    from ptum.config import to_dict

    sizes = to_dict(params.pretrain.model)
    id_min_count = sizes.pop("id_min_count")
    return {
        "synthetic": (300, 3000, 50) if args.quick else (2000, 20000, 100),
        "model": sizes if args.quick else PAPER,
        "id_min_count": id_min_count,
        "pretrain": {
            k: getattr(params.pretrain, k)
            for k in ("mbp", "nbp", "k", "lam", "p", "negatives", "lr")
        },
        "max_behaviors": params.prepare.max_behaviors,
        "max_tokens": params.tokenize.max_tokens,
        "vocab_size": params.tokenize.vocab_size,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": 1,
        "device": "cuda" if args.gpu else "cpu",
        "threads": args.threads,
        "count_flops": args.gpu,
    }


def main() -> None:
    from ptum.config import load_params

    args = _arguments()
    params = load_params(PARAMS)
    base = _child_args(params, args)
    with tempfile.TemporaryDirectory() as tmp:
        cases = []
        if args.quick:
            pass
        elif args.movielens.exists():
            prepare_movielens(args.movielens, Path(tmp), params)
            cases.append(("MovieLens-100K", tmp))
        else:
            print(f"(skipping MovieLens: {args.movielens} not found)")
        n_users, _, n_beh = base["synthetic"]
        cases.append((f"synthetic {n_users} u x {n_beh} beh", "synthetic"))
        print(
            f"device: {base['device']}; threads: {args.threads}; model: HSA, sizes "
            f"{base['model']}; batch {args.batch} users; {args.steps} timed steps after 1 "
            f"warm-up; load average at start {os.getloadavg()[0]:.2f}"
        )
        print(
            f"{'data':28} {'encoder':>8} {'encoding':>9} {'users/s':>9} {'s/step':>8} "
            f"{'peak MiB':>9}" + (f" {'TFLOP/s':>8}" if args.gpu else "")
        )
        for name, data in cases:
            _bench_case(name, {**base, "data": data}, gpu=args.gpu)


def _bench_case(name: str, base: dict, *, gpu: bool) -> None:
    """The three variants of one data set, each in its own child process, and the speed-ups."""
    variants = [("text", True), ("text", False), ("hybrid", True)]
    res = {}
    for encoder, unique in variants:
        res[encoder, unique] = r = run_child({**base, "encoder": encoder, "unique": unique})
        print(
            f"{name:28} {encoder:>8} {'unique' if unique else 'naive':>9} "
            f"{r['users_per_s']:>9.1f} {r['step_s']:>8.2f} {r['peak_mib']:>9.0f}"
            + (f" {r['tflops']:>8.2f}" if gpu else ""),
            flush=True,
        )
    text, naive, hybrid = (res[v]["users_per_s"] for v in variants)
    print(
        f"{name:28} speed-up unique/naive: {text / naive:.1f}x; "
        f"hybrid/text (unique): {hybrid / text:.2f}x"
    )


if __name__ == "__main__":
    time.sleep(0)
    main()
