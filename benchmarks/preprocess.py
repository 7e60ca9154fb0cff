"""Benchmark: prepare + tokenize throughput (behaviors/s) and peak memory on synthetic logs.

    python benchmarks/preprocess.py [--sizes 1000000 10000000]

Each size is generated first (not timed), then `prepare` and `tokenize` run in a fresh child
process whose peak RSS is read from the OS, so numbers of one size do not leak into the next.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
from pathlib import Path
from ptum.data.prepare import PrepareOptions, prepare
from ptum.tokenize import tokenize
root = Path(sys.argv[1])
t0 = time.perf_counter()
rep = prepare(root / "raw", root / "prepared", PrepareOptions())
t1 = time.perf_counter()
tokenize(root / "prepared" / "items.parquet", root / "tok", vocab_size=8000, model_type="unigram",
         byte_fallback=True, max_tokens=30, character_coverage=0.9995, seed=1)
t2 = time.perf_counter()
print(json.dumps({"prepare_s": t1 - t0, "tokenize_s": t2 - t1,
                  "behaviors": rep["behaviors"]["rows_kept"], "items": rep["behaviors"]["items"],
                  "users": rep["behaviors"]["users"]}))
"""


def run(n_behaviors: int) -> dict:
    from ptum.data.ingest import ingest
    from ptum.data.synthetic import spec_for

    spec = spec_for("large")
    n_users = max(int(n_behaviors / spec.mean_behaviors), 100)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        import ptum.data.synthetic as synthetic

        # Generate with the 'large' preset's shape, scaled in users to reach n_behaviors.
        synthetic.PRESETS["bench"] = spec_for("large", n_users=n_users)
        ingest(source="synthetic", path="", out_dir=root / "raw", size="bench", seed=1)
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", CHILD, str(root)], check=True,
                             capture_output=True, text=True)
        wall = time.perf_counter() - t0
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        res = json.loads(out.stdout.strip().splitlines()[-1])
        res.update(wall_s=wall, behaviors_per_s=res["behaviors"] / (res["prepare_s"] + res["tokenize_s"]),
                   peak_rss_mib=peak_kib / 1024, peak_is_max_so_far=peak_kib <= before)
        return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    args = ap.parse_args()
    import os

    print(f"machine: {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    print(f"{'behaviors':>12} {'users':>8} {'items':>7} {'prepare s':>10} {'tokenize s':>10} "
          f"{'behaviors/s':>12} {'peak RSS MiB':>12}")
    for n in args.sizes:
        r = run(n)
        print(f"{r['behaviors']:>12,} {r['users']:>8,} {r['items']:>7,} {r['prepare_s']:>10.2f} "
              f"{r['tokenize_s']:>10.2f} {r['behaviors_per_s']:>12,.0f} {r['peak_rss_mib']:>12,.0f}"
              + ("  (peak RSS is the max over children so far)" if r["peak_is_max_so_far"] else ""))


if __name__ == "__main__":
    main()
