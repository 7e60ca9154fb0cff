"""Benchmark: prepare + tokenize throughput (behaviors/s) and peak memory on synthetic logs.

    python benchmarks/preprocess.py [--sizes 1000000 10000000] [--repeat 3] [--cache DIR]
                                    [--chunk-rows N]

Each size is generated first (not timed; kept under --cache DIR to be reused by later runs),
then `prepare` and `tokenize` run in a fresh child process that reads its own peak RSS from the
OS, so numbers of one size do not leak into the next. With --repeat N each size runs N times and
the fastest run (prepare + tokenize) is printed, with the run count: on a shared machine the
best of several runs is the least disturbed one; its CPU time (all threads) and the load average
when it started are printed too, to tell a slow run from a busy machine.

The prepare and tokenize options are params.yaml's `prepare:` and `tokenize:` sections, with one
stated override: --chunk-rows sets prepare.chunk_rows (default: params.yaml's), the size above
which a log streams through in chunks of whole users.
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

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from ptum.config import load_params
from ptum.data.prepare import prepare
from ptum.stages.prepare import prepare_options
from ptum.tokenize import tokenize
def peak_kib():
    # VmHWM: this process image's own peak. ru_maxrss is not: Linux carries the parent's peak
    # over fork/vfork + exec, so a child started after the parent generated a big log would
    # report the parent's memory.
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
root = Path(sys.argv[1])
params = load_params(sys.argv[2], json.loads(sys.argv[3]))
t, opts = params.tokenize, prepare_options(params.prepare)
t0, c0 = time.perf_counter(), time.process_time()
rep = prepare(root / "raw", root / "prepared", opts)
t1 = time.perf_counter()
tokenize(root / "prepared" / "items.parquet", root / "tok", vocab_size=t.vocab_size,
         model_type=t.model_type, byte_fallback=t.byte_fallback, max_tokens=t.max_tokens,
         character_coverage=t.character_coverage, seed=t.seed)
t2, c2 = time.perf_counter(), time.process_time()
print(json.dumps({"prepare_s": t1 - t0, "tokenize_s": t2 - t1, "cpu_s": c2 - c0,
                  "behaviors": rep["behaviors"]["rows_kept"], "items": rep["behaviors"]["items"],
                  "users": rep["behaviors"]["users"],
                  "peak_kib": peak_kib()}))
"""


def generate(n_behaviors: int, raw_dir: Path) -> None:
    """Synthetic log with the 'large' preset's shape, scaled in users to reach n_behaviors."""
    import ptum.data.synthetic as synthetic
    from ptum.data.ingest import ingest

    spec = synthetic.spec_for("large")
    n_users = max(int(n_behaviors / spec.mean_behaviors), 100)
    synthetic.PRESETS["bench"] = synthetic.spec_for("large", n_users=n_users)
    ingest(source="synthetic", path="", out_dir=raw_dir, size="bench", seed=1)


def run(root: Path, options: list[str]) -> dict:
    """prepare + tokenize on root/raw in a child process; its timings and peak RSS."""
    load = os.getloadavg()[0]  # other jobs on the machine: timings are only comparable at low load
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(root), str(PARAMS), json.dumps(options)],
        check=True,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    res = json.loads(out.stdout.strip().splitlines()[-1])
    n = res["behaviors"]
    res.update(
        wall_s=wall,
        load=load,
        behaviors_per_s=n / (res["prepare_s"] + res["tokenize_s"]),
        prepare_per_s=n / res["prepare_s"],
        tokenize_per_s=n / res["tokenize_s"],
        peak_rss_mib=res["peak_kib"] / 1024,
    )
    return res


def best_of(n_behaviors: int, repeat: int, cache: Path | None, options: list[str]) -> dict:
    """The fastest of `repeat` runs on one generated log."""
    with tempfile.TemporaryDirectory() as tmp:
        root = (cache / str(n_behaviors)) if cache else Path(tmp)
        if not (root / "raw" / "manifest.json").exists():
            generate(n_behaviors, root / "raw")
        runs = [run(root, options) for _ in range(repeat)]
    best = min(runs, key=lambda r: r["prepare_s"] + r["tokenize_s"])
    best["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)  # memory: the worst run
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--repeat", type=int, default=1, help="runs per size; the fastest is shown")
    ap.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="keep generated logs here (DIR/<size>/raw) and reuse them",
    )
    ap.add_argument(
        "--chunk-rows",
        type=int,
        default=None,
        help="prepare.chunk_rows (default: the stage's own default)",
    )
    args = ap.parse_args()
    from ptum.config import load_params

    options = [] if args.chunk_rows is None else [f"prepare.chunk_rows={args.chunk_rows}"]
    chunk_rows = load_params(PARAMS, options).prepare.chunk_rows

    print(
        f"machine: {os.cpu_count()} CPUs, python {sys.version.split()[0]}; best of "
        f"{args.repeat} run(s); rates are behaviors/s; prepare.chunk_rows={chunk_rows:,}"
    )
    print(
        "cpu s: CPU time of prepare + tokenize, all threads; load: 1-minute load average when "
        "the run started"
    )
    print(
        f"{'behaviors':>12} {'users':>8} {'items':>7} {'prepare s':>10} {'tokenize s':>10} "
        f"{'prepare/s':>11} {'tokenize/s':>11} {'behaviors/s':>12} {'peak RSS MiB':>12} "
        f"{'cpu s':>6} {'load':>5}"
    )
    for n in args.sizes:
        r = best_of(n, args.repeat, args.cache, options)
        print(
            f"{r['behaviors']:>12,} {r['users']:>8,} {r['items']:>7,} {r['prepare_s']:>10.2f} "
            f"{r['tokenize_s']:>10.2f} {r['prepare_per_s']:>11,.0f} {r['tokenize_per_s']:>11,.0f} "
            f"{r['behaviors_per_s']:>12,.0f} {r['peak_rss_mib']:>12,.0f} {r['cpu_s']:>6.2f} "
            f"{r['load']:>5.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
