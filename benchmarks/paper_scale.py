"""Benchmark: the pipeline at the paper's scale (the `paper` synthetic preset, 500,000 users and
about 63M behaviors), stage by stage: wall seconds, throughput and peak RSS.

    python benchmarks/paper_scale.py [--users 500000] [--work DIR] [--reuse] [--json FILE]
    python benchmarks/paper_scale.py --scaling [--scaling-users 6000 50000 500000] [--model]

For --users N (the `paper` preset with n_users = N; the preset itself at 500,000) each stage
runs in a fresh child process, in a project directory DIR/N (default under /tmp) holding a
params.yaml (this repository's, with the overrides in OVERRIDES) and the stages' outputs under
data/ and models/, as `dvc repro` would lay them out:

    ingest      the generator writing data/raw (the library's `ingest`: data.size cannot name
                an overridden preset, so the child registers it as `paper-N` first)
    prepare     `ptum prepare`    tokenize  `ptum tokenize`
    pretrain    `ptum pretrain --arch hsa` with pretrain.epochs=1: one full epoch of the default
                HSA, checkpointed at its end; stopped by Ctrl-C or SIGTERM (not SIGKILL) it
                checkpoints its next step, and a rerun with --reuse resumes there (the row's
                seconds are then those of the rest of the epoch)
    export      `ptum export --arch hsa` (ONNX, with the serving heads of export.heads)
    embed       `ptum embed --arch hsa`: every user of data/raw from the ONNX export

Each child reads its own peak RSS (VmHWM) when it ends (benchmarks/preprocess.py explains why not
ru_maxrss). With --reuse a stage whose output exists is not rerun (its row shows "reused"). The
table gives the CPU model, the 1-minute load average when each stage started, the commit and the
thread setting (OMP_NUM_THREADS, passed on to every child); on a shared machine read the times
as upper bounds. --scaling runs the data stages at each --scaling-users size (with --model the
other three too) and prints one table of all, for the linearity of time in behaviors.
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

ROOT = Path(__file__).resolve().parents[1]
ARCH = "hsa"
PAPER_USERS = 500_000
STAGES = ("ingest", "prepare", "tokenize", "pretrain", "export", "embed")
DATA_STAGES = STAGES[:3]
# The benchmark's changes to params.yaml: the paper preset, one pre-training epoch of one model.
OVERRIDES = ["data.size=paper", f"pretrain.architectures=[{ARCH}]", "pretrain.epochs=1"]
# What each stage leaves behind (--reuse skips a stage that has it).
OUTPUT = {
    "ingest": "data/raw/manifest.json",
    "prepare": "data/prepared/manifest.json",
    "tokenize": "data/tokenized/manifest.json",
    "pretrain": f"reports/pretrain/{ARCH}/metrics.json",  # written when the epoch is done
    "export": f"models/onnx/{ARCH}/export.json",
    "embed": f"data/embeddings/{ARCH}.parquet",
}
CHILD = "import sys; from benchmarks.paper_scale import child; child(sys.argv[1:])"


def _peak_kib() -> int:
    """This process's own peak RSS (VmHWM), KiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def child(argv: list[str]) -> None:
    """In a fresh process (cwd = the project): run one stage, then write {seconds, peak_kib,
    code} to argv[0]. argv: RESULT STAGE USERS."""
    result, stage, users = Path(argv[0]), argv[1], int(argv[2])
    t0, code = time.perf_counter(), 1
    try:
        if stage == "ingest":
            code = _ingest(users)
        else:
            from ptum.cli import main

            arch = ["--arch", ARCH] if stage in ("pretrain", "export", "embed") else []
            code = main([stage, *arch, *[a for o in OVERRIDES for a in ("--set", o)]])
    finally:
        seconds = time.perf_counter() - t0
        result.write_text(json.dumps({"seconds": seconds, "peak_kib": _peak_kib(), "code": code}))
    sys.exit(code)


def _ingest(users: int) -> int:
    """data/raw from the `paper` preset with n_users = `users` (registered as `paper-USERS`
    unless it is the preset's own size)."""
    from ptum.config import load_params
    from ptum.data import synthetic
    from ptum.data.ingest import ingest

    name = "paper" if users == synthetic.PRESETS["paper"].n_users else f"paper-{users}"
    synthetic.PRESETS[name] = synthetic.spec_for("paper", n_users=users)
    seed = load_params(Path("params.yaml"), OVERRIDES).data.seed
    ingest(source="synthetic", path="", out_dir=Path("data/raw"), size=name, seed=seed)
    return 0


def _project(work: Path, users: int) -> Path:
    """work/USERS with this repository's params.yaml (the overrides go on each command line)."""
    proj = work / str(users)
    proj.mkdir(parents=True, exist_ok=True)
    (proj / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    return proj


def _counts(proj: Path) -> dict[str, int]:
    """Behaviors and users of the prepared data (what the rates divide), from its report."""
    report = json.loads((proj / "data/prepared/report.json").read_text())
    return {
        "behaviors": report["behaviors"]["rows_kept"],
        "prepared_users": report["behaviors"]["users"],
    }


def run_stage(proj: Path, stage: str, users: int) -> dict:
    """One stage in a fresh child process; its wall seconds, peak RSS and the load at start."""
    result = proj / f".bench-{stage}.json"
    result.unlink(missing_ok=True)
    load = os.getloadavg()[0]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    log = proj / f"bench-{stage}.log"
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(result), stage, str(users)],
            cwd=proj,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        sys.exit(f"paper_scale: {stage} at {users:,} users failed ({proc.returncode}):\n{tail}")
    res = json.loads(result.read_text())
    return {"stage": stage, "wall_s": wall, "peak_mib": res["peak_kib"] / 1024, "load": load}


def run_size(
    work: Path, users: int, stages: tuple[str, ...], reuse: bool, commit: str
) -> list[dict]:
    """Every stage of `stages` at `users` users, in order; rows with the rates filled in (a
    reused row keeps the commit it was measured at)."""
    proj = _project(work, users)
    rows = []
    for stage in stages:
        saved = proj / f"bench-{stage}.json"  # the stage's last measured row
        if reuse and (proj / OUTPUT[stage]).exists():
            rows.append({**_read(saved), "stage": stage, "reused": True})
            continue
        print(f"paper_scale: {users:,} users: {stage} ...", file=sys.stderr, flush=True)
        rows.append({**run_stage(proj, stage, users), "commit": commit})
        saved.write_text(json.dumps(rows[-1]))
    counts = _counts(proj) if (proj / "data/prepared/report.json").exists() else {}
    for row in rows:
        row.update(users=users, **counts)
        if "wall_s" in row and counts:
            # Data stages: behaviors/s; the model stages work per user (pretrain: the
            # training users of one epoch are ~95% of them; the rate counts all).
            per = "behaviors" if row["stage"] in DATA_STAGES else "prepared_users"
            row["rate"] = counts[per] / row["wall_s"]
            row["rate_unit"] = "behaviors/s" if per == "behaviors" else "users/s"
    return rows


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _header() -> dict:
    """The machine, its load and the code: what a reader needs to compare two tables."""
    model = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in model.splitlines() if "Model name" in ln), "?"
    )
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "load_at_start": os.getloadavg()[0],
        "commit": commit + ("+dirty" if dirty else ""),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "overrides": OVERRIDES,
    }


def print_table(header: dict, rows: list[dict]) -> None:
    print(
        f"cpu: {header['cpu']} ({header['cpus']} CPUs); load at start {header['load_at_start']:.2f}; "
        f"commit {header['commit']}; OMP_NUM_THREADS={header['omp_num_threads']}"
    )
    print(f"params.yaml with {' '.join(header['overrides'])}")
    print(
        f"{'users':>8} {'behaviors':>11} {'stage':<9} {'seconds':>9} {'rate':>12} {'unit':<12} "
        f"{'peak RSS MiB':>12} {'load':>5}"
    )
    for r in rows:
        lead = f"{r['users']:>8,} {r.get('behaviors', 0):>11,} {r['stage']:<9}"
        if "wall_s" not in r:  # reused, never measured
            print(f"{lead} {'reused':>9}")
            continue
        rate = f"{r['rate']:>12,.0f} {r['rate_unit']:<12}" if "rate" in r else f"{'':>25}"
        again = f" (reused: measured at {r.get('commit', '?')})" if r.get("reused") else ""
        print(f"{lead} {r['wall_s']:>9.1f} {rate} {r['peak_mib']:>12,.0f} {r['load']:>5.2f}{again}")


def print_scaling(rows: list[dict]) -> None:
    """Per stage, each size against the one before: x behaviors, x seconds, x peak RSS, and
    the seconds per extra behavior (linear time: a constant; sub-linear memory: x peak RSS
    below x behaviors)."""
    by_stage: dict[str, list[dict]] = {}
    for r in rows:
        if "wall_s" in r and r.get("behaviors"):
            by_stage.setdefault(r["stage"], []).append(r)
    print(
        f"{'stage':<9} {'users':>17} {'x behaviors':>11} {'x seconds':>9} {'x peak':>6} "
        f"{'us/extra behavior':>17}"
    )
    for stage, runs in by_stage.items():
        for a, b in zip(runs, runs[1:]):
            extra = (b["wall_s"] - a["wall_s"]) / max(b["behaviors"] - a["behaviors"], 1) * 1e6
            print(
                f"{stage:<9} {a['users']:>8,}>{b['users']:>8,} "
                f"{b['behaviors'] / a['behaviors']:>11.1f} {b['wall_s'] / a['wall_s']:>9.1f} "
                f"{b['peak_mib'] / a['peak_mib']:>6.1f} {extra:>17.3f}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=PAPER_USERS)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ptum-paper-scale")
    ap.add_argument("--reuse", action="store_true", help="skip a stage whose output exists")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=None, help="default: all")
    ap.add_argument("--scaling", action="store_true", help="data stages at --scaling-users")
    ap.add_argument("--scaling-users", type=int, nargs="+", default=[6_000, 50_000, 500_000])
    ap.add_argument("--model", action="store_true", help="--scaling: also pretrain/export/embed")
    ap.add_argument("--json", type=Path, default=None, help="write the header and rows here")
    args = ap.parse_args()
    header = _header()
    if args.scaling:
        stages = tuple(args.stages or (STAGES if args.model else DATA_STAGES))
        sizes = args.scaling_users
    else:
        stages, sizes = tuple(args.stages or STAGES), [args.users]
    rows = [r for n in sizes for r in run_size(args.work, n, stages, args.reuse, header["commit"])]
    print_table(header, rows)
    if len(sizes) > 1:
        print_scaling(rows)
    if args.json:
        args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
