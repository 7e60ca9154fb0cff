"""Benchmark: user-embedding latency and throughput, onnxruntime vs PyTorch eager, on CPU.

    python benchmarks/serve.py [--threads 1] [--iters 200] [--batch 256] [--no-int8] [--opset N]

Two HSA models, both with RANDOM weights (timing does not depend on training; the int8 cosine
column compares int8 with fp32 outputs of the same random model):
    paper       word_dim 300, dim 256, 16 heads x 16, attention hidden 200, 50 behaviors x 30 tokens
    cpu-default params.yaml pretrain.model sizes, prepare.max_behaviors x tokenize.max_tokens
Every user is full length (all behaviors and tokens real), the serving worst case. Latency is
batch 1 (p50 / p99 over --iters calls after warm-up); throughput is users/s at batch 256. Both
engines get the same intra-op thread count, 1 by default: one request per core is the usual CPU
serving layout, and on a shared machine multi-threaded OpenMP (torch) collapses under other
load, which would flatter onnxruntime. Batch-1 calls are timed round-robin so background load
hits the engines alike (batch-256 calls one engine after another, for memory); warm-up is 10
calls at batch 1 and 1 at batch 256 per engine; torch runs under torch.inference_mode. The ONNX model is written by
`ptum.serving.export.export`, the same path `ptum export` takes: by default the folded serving graph
(`ptum.serving.fold.serving_model`: embedding x qkv and attention-out x pooling multiplied out) at
params.yaml's opset, where (>= 23) each self-attention is one ONNX Attention node; --opset 18
gives the graphs without it. Rows:
    torch eager              the model as trained, the baseline of the "x torch" column
    torch eager folded       torch running the same folded module that is exported: shows how
                             much of onnxruntime's lead is the folding rather than the engine
    onnxruntime unfolded     export(fold=False): no folding (at opset >= 23 the attention is
                             still one Attention node)
    onnxruntime              the default export (folded)
    onnxruntime int8         the default export, dynamic quantization (quantize_dynamic, QInt8,
                             MatMul and Gather weights)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptum import checkpoint  # noqa: E402
from ptum.config import load_params, to_dict  # noqa: E402
from ptum.hashing import sha256_file as file_sha256  # noqa: E402
from ptum.models.user_model import ModelConfig, UserModel  # noqa: E402
from ptum.serving.export import export  # noqa: E402
from ptum.serving.fold import serving_model  # noqa: E402
from ptum.serving.parity import example_inputs  # noqa: E402


def configs() -> dict[str, ModelConfig]:
    p = load_params(ROOT / "params.yaml")
    vocab = p.tokenize.vocab_size
    paper = ModelConfig.for_architecture(
        "hsa",
        vocab_size=vocab,
        max_tokens=30,
        max_behaviors=50,
        word_dim=300,
        dim=256,
        heads=16,
        head_dim=16,
        attn_hidden=200,
    )
    cpu = ModelConfig.for_architecture(
        "hsa",
        vocab_size=vocab,
        max_tokens=p.tokenize.max_tokens,
        max_behaviors=p.prepare.max_behaviors,
        **to_dict(p.pretrain.model),
    )
    return {"paper": paper, "cpu-default": cpu}


def interleaved(fns: dict[str, object], iters: int, warmup: int) -> dict[str, np.ndarray]:
    """Seconds per call of each fn, timed round-robin (one call each, rotating the order) so
    that background load on a shared machine hits every engine alike."""
    names = list(fns)
    out = {n: np.empty(iters) for n in names}
    for i in range(warmup + iters):
        for j in range(len(names)):
            n = names[(i + j) % len(names)]
            t0 = time.perf_counter()
            fns[n]()
            if i >= warmup:
                out[n][i - warmup] = time.perf_counter() - t0
    return out


def session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def bench_model(
    name: str,
    config: ModelConfig,
    work: Path,
    *,
    threads: int,
    iters: int,
    batch: int,
    int8: bool,
    opset: int,
) -> list[dict]:
    torch.manual_seed(0)
    model = UserModel(config=config).eval()
    spm = work / "spm.model"
    spm.write_bytes(b"placeholder: the benchmark feeds token ids directly")
    checkpoint.save(
        work / name / "ckpt",
        model,
        {
            "architecture": "hsa",
            "tokenizer_sha256": file_sha256(spm),
            "model_config": config.to_dict(),
        },
    )
    export_s = {}
    for fold in (True, False):
        t0 = time.perf_counter()
        export(
            work / name / "ckpt",
            work / name / f"onnx_{fold}",
            spm_model=spm,
            data_version="benchmark",
            params={"benchmark": "random weights"},
            fold=fold,
            opset=opset,
        )
        export_s[fold] = time.perf_counter() - t0
    fp32 = work / name / "onnx_True" / "user_model.onnx"
    L, T = config.max_behaviors, config.max_tokens
    one = example_inputs(config, [L], behaviors=L, tokens=T, seed=1)
    one["token_mask"][:] = True  # full-length texts too
    one["tokens"] = one["tokens"].clamp_min(1)
    many = {k: v.expand(batch, *v.shape[1:]).contiguous() for k, v in one.items()}
    rows = []

    folded = serving_model(model)

    def torch_fn(x, m=model):
        def run():
            with torch.inference_mode():
                return m(**x)

        return run

    # A batch-256 call leaves GBs in onnxruntime's arena (the (B*L, heads, T, T) attention
    # scores); five engines' arenas together would not fit a 24 GB machine. So throughput is
    # timed one engine after another, and a run with this option hands the arena back after.
    shrink = ort.RunOptions()
    shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def ort_fn(s, x):
        feed = {k: v.numpy() for k, v in x.items()}
        return lambda: s.run(["user"], feed)[0]

    engines = {
        "torch eager": (torch_fn(one), torch_fn(many)),
        "torch eager folded": (torch_fn(one, folded), torch_fn(many, folded)),
    }
    sessions = {
        "onnxruntime unfolded": session(work / name / "onnx_False" / "user_model.onnx", threads),
        "onnxruntime": session(fp32, threads),
    }
    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        q = fp32.with_name("user_model.int8.onnx")
        logging.getLogger().setLevel(logging.ERROR)  # "consider pre-processing" advice
        # Not "Attention": the quantizer takes the ONNX Attention op for the contrib op of the
        # same name and writes an invalid QAttention node.
        quantize_dynamic(
            str(fp32),
            str(q),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gather"],
        )
        sessions["onnxruntime int8"] = session(q, threads)
    for k, s in sessions.items():
        engines[k] = (ort_fn(s, one), ort_fn(s, many))
    # Agreement with torch fp32 on varied users (lengths 0..L), not the timing batch's copies.
    lengths = np.random.default_rng(2).integers(0, L + 1, batch).tolist()
    varied = example_inputs(config, lengths, behaviors=L, tokens=T, seed=2)
    with torch.inference_mode():
        ref = model(**varied).numpy()
    lat = interleaved({k: f1 for k, (f1, _) in engines.items()}, iters, warmup=10)
    thr = {}
    for k, (_, fb) in engines.items():
        thr |= interleaved({k: fb}, 3, warmup=1)
        if k in sessions:
            sessions[k].run(["user"], {n: v.numpy() for n, v in one.items()}, shrink)
    for engine in engines:
        ms = lat[engine] * 1e3
        row = {
            "model": name,
            "engine": engine,
            "p50_ms": np.percentile(ms, 50),
            "p99_ms": np.percentile(ms, 99),
            "users_per_s": batch / np.median(thr[engine]),
        }
        if engine in sessions:
            feed = {k: v.numpy() for k, v in varied.items()}
            out = sessions[engine].run(["user"], feed, shrink)[0]
            cos = (out * ref).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1))
            row["cosine_min"] = float(cos.min())
            row["max_abs_diff"] = float(np.abs(out - ref).max())
        rows.append(row)
    base = rows[0]["p50_ms"]
    for r in rows:
        r["speedup_b1"] = base / r["p50_ms"]
    print(
        f"  {name}: exported in {export_s[True]:.1f}s (unfolded {export_s[False]:.1f}s); "
        f"{L} behaviors x {T} tokens, dim {config.dim}, "
        f"word_dim {config.word_dim}, heads {config.heads}x{config.head_dim}",
        flush=True,
    )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per engine")
    ap.add_argument("--iters", type=int, default=200, help="batch-1 calls timed per engine")
    ap.add_argument("--batch", type=int, default=256, help="throughput batch size")
    ap.add_argument("--no-int8", dest="int8", action="store_false")
    ap.add_argument(
        "--opset",
        type=int,
        default=None,
        help="ONNX opset of the exports (default params.yaml export.opset; < 23: no Attention op)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    opset = args.opset or load_params(ROOT / "params.yaml").export.opset
    print(
        f"CPU: {os.cpu_count()} logical cores (load average {os.getloadavg()[0]:.1f}), "
        f"{args.threads} intra-op thread(s) per engine; opset {opset}; "
        f"torch {torch.__version__}, onnxruntime {ort.__version__}"
    )
    print("NOTE: random weights (timing only; accuracy columns compare engines on one model)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in configs().items():
            rows += bench_model(
                name,
                config,
                Path(tmp),
                threads=args.threads,
                iters=args.iters,
                batch=args.batch,
                int8=args.int8,
                opset=opset,
            )
    head = (
        f"{'model':<12} {'engine':<20} {'p50 ms':>8} {'p99 ms':>8} {'x torch':>8} "
        f"{'users/s':>9} {'cos min':>8} {'max |diff|':>10}"
    )
    print(
        "\nbatch 1 latency (p50/p99, speedup vs torch eager p50), "
        f"batch {args.batch} throughput, agreement with torch fp32"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        cos = f"{r['cosine_min']:.5f}" if "cosine_min" in r else "-"
        diff = f"{r['max_abs_diff']:.2e}" if "max_abs_diff" in r else "-"
        print(
            f"{r['model']:<12} {r['engine']:<20} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
            f"{r['speedup_b1']:>7.2f}x {r['users_per_s']:>9.1f} {cos:>8} {diff:>10}"
        )


if __name__ == "__main__":
    main()
