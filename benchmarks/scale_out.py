"""Benchmark: each part that scales out, the local way vs the distributed way (docs/scale-out.md).

    python benchmarks/scale_out.py                      # the workspace's data, after `dvc repro`
    python benchmarks/scale_out.py --only pretrain --epochs 3
    python benchmarks/scale_out.py --data DIR           # DIR/data/{prepared,tokenized}, DIR/models
    python benchmarks/scale_out.py --tiny               # smoke check: tiny data and models, 2-3 min

Three figures, each the local way vs the distributed way on the same data and seeds, one run at
a time (nothing else of the benchmark runs meanwhile), every output in a temporary directory:

1. grid on Dask: the Demo grid of params.yaml's finetune section (`grid_options` / `grid_axes`,
   as the finetune stage builds them; --repeats re-drawn splits, default 1) run by `run_grid`
   with `finetune.executor: local` (finetune.workers spawned processes) and then with
   `finetune.executor: dask` (a LocalCluster of as many workers), each from an empty cell cache
   in a fresh child process; wall seconds, and whether every cell's result (metrics and test
   predictions, not its run time) is the same.
2. pre-training across machines: `ptum pretrain --arch hsa --nproc 2` vs two "machines" on
   127.0.0.1 (`--nnodes 2 --node-rank 0|1 --rdzv-endpoint 127.0.0.1:PORT`, one process each,
   started together), --epochs epochs; wall seconds, mean users/s over the epochs (the run's
   reports/history.json) and whether the two checkpoints' weights are bit-identical.
3. tuning on PostgreSQL: `ptum tune --workers 2` on SQLite vs two `ptum tune --worker 0|1`
   processes (two "machines", each its own directory) on one database of a throw-away
   PostgreSQL server (pgserver, Unix socket, durable settings), the same --trials budget;
   wall seconds, trials done and the best value. Which worker draws which trial is a race in
   both ways (trial i trains with seed tune.seed + i), so the studies are compared, not required
   to agree.

Options: --params (default params.yaml) with stated overrides: finetune.repeats / workers /
executor (grid), pretrain.epochs (pre-training), tune.n_trials / epochs / finetune_epochs /
storage (tuning), --set for more, and --tiny's sizes (TINY). Every `ptum` runs with one torch
thread per process (OMP_NUM_THREADS=1). On one machine the distributed way cannot be faster: the
figures are each engine's overhead. Do not run anything else meanwhile; quote the header.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ARCH = "hsa"

# --tiny: the tests' sizes (tests/conftest.py tiny_pipeline, tests/faults/harness.py PARAMS).
TINY = [
    "prepare.max_behaviors=20",
    "pretrain.model.word_dim=16",
    "pretrain.model.dim=16",
    "pretrain.model.heads=2",
    "pretrain.model.head_dim=8",
    "pretrain.model.attn_hidden=16",
    "pretrain.model.dropout=0.0",
    "pretrain.model.layers=1",
    "pretrain.batch_size=16",
    "finetune.max_epochs=1",
    "finetune.head_hidden=16",
    "finetune.class_weights=[none]",
    "finetune.ratios=[1.0]",
    "tune.prune_startup_trials=1",
]

# One grid, timed, in a fresh process (as `ptum finetune` would run it): argv[1] is the JSON that
# bench_grid writes. Cell results go to a JSON file; the parent compares them.
GRID_CHILD = "import sys; from benchmarks.scale_out import grid_child; grid_child(sys.argv[1])"


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _project(data: Path, dest: Path, params: Path) -> Path:
    """A run directory: `params` as params.yaml, data/prepared and data/tokenized linked from
    `data` (read only), everything else (outputs, locks, data/tune) its own."""
    (dest / "data").mkdir(parents=True)
    for sub in ("prepared", "tokenized"):
        (dest / "data" / sub).symlink_to((data / "data" / sub).resolve())
    shutil.copyfile(params, dest / "params.yaml")
    return dest


def _start(proj: Path, log: Path, *args: str) -> subprocess.Popen:
    """`ptum ARGS` in `proj`, its output in `log`."""
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "ptum", *args],
            cwd=proj,
            env=_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _finish(procs: list[subprocess.Popen], logs: list[Path]) -> None:
    """Wait for every process; on a failure stop the others and exit with the log's tail."""
    try:
        for p in procs:
            p.wait()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs, strict=True):
        if p.returncode != 0:
            tail = log.read_text(errors="replace")[-3000:]
            sys.exit(f"scale_out: {' '.join(map(str, p.args))} failed ({p.returncode}):\n{tail}")


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def first_difference(a: Any, b: Any, where: str = "") -> str | None:
    """Where `a` and `b` (JSON values) first differ, or None; NaN equals NaN."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{where or 'top'}: keys {sorted(a.keys() ^ b.keys())} in one only"
        for k in a:
            found = first_difference(a[k], b[k], f"{where}.{k}" if where else str(k))
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{where}: {len(a)} vs {len(b)} entries"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            found = first_difference(x, y, f"{where}[{i}]")
            if found:
                return found
        return None
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return None
    return None if a == b and type(a) is type(b) else f"{where}: {a!r} vs {b!r}"


# ---------------------------------------------------------------- 1. grid on Dask


def grid_child(arg: str) -> None:
    """Run one Demo grid from an empty cache (child process); print its seconds."""
    from ptum.config import load_params
    from ptum.finetune.grid import run_grid
    from ptum.stages.finetune import grid_axes, grid_options, split_spec

    a = json.loads(arg)
    data = Path(a["data"])
    p = load_params(Path(a["params"]), a["overrides"])
    options = grid_options(
        p.finetune,
        split=split_spec(p),
        prepared=data / "data" / "prepared",
        tokenized=data / "data" / "tokenized",
        max_behaviors=p.prepare.max_behaviors,
        ckpt_root=data / "models" / "pretrain",
        cache_dir=Path(a["cache"]),
    )
    t0 = time.perf_counter()
    runs = run_grid(grid_axes(p.finetune, "demo"), options)
    seconds = time.perf_counter() - t0
    runs = [{k: v for k, v in r.items() if k != "seconds"} for r in runs]  # run time, not result
    Path(a["results"]).write_text(json.dumps(runs))
    print(json.dumps({"seconds": seconds, "cells": len(runs)}))


def bench_grid(args: argparse.Namespace, base: list[str], tmp: Path) -> dict:
    figures: dict[str, Any] = {}
    runs = {}
    grid = [f"finetune.repeats={args.repeats}", f"finetune.workers={args.workers}"]
    for executor in ("local", "dask"):
        work = tmp / f"grid-{executor}"
        work.mkdir()
        child = {
            "params": str(args.params),
            "overrides": [*base, *grid, f"finetune.executor={executor}"],
            "data": str(args.data),
            "cache": str(work / "cache"),  # empty: every cell runs
            "results": str(work / "runs.json"),
        }
        log = work / "log.txt"
        with log.open("w") as err:
            p = subprocess.run(
                [sys.executable, "-c", GRID_CHILD, json.dumps(child)],
                cwd=work,
                env=_env(),
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        if p.returncode != 0:
            sys.exit(f"scale_out: grid ({executor}) failed:\n{log.read_text()[-3000:]}")
        figures[executor] = json.loads(p.stdout.strip().splitlines()[-1])
        runs[executor] = json.loads((work / "runs.json").read_text())
        print(
            f"grid, executor {executor}: {figures[executor]['cells']} cells in "
            f"{figures[executor]['seconds']:.1f} s",
            flush=True,
        )
    # Every cell's fields, test metrics and test predictions, in grid order.
    diff = first_difference(runs["local"], runs["dask"])
    if diff is not None and len(runs["local"]) == len(runs["dask"]):  # name the cell
        i = next(i for i, (a, b) in enumerate(zip(*runs.values())) if first_difference(a, b))
        c = runs["local"][i]
        diff = f"cell {c['label']}/{c['model']}/{c['mode']}/{c['ratio']}/{c['seed']}: {diff}"
    local, dask = figures["local"]["seconds"], figures["dask"]["seconds"]
    return {
        "engine": f"grid on Dask (Demo, {figures['local']['cells']} cells)",
        "local": f"{local:.1f} s ({args.workers} local processes)",
        "distributed": f"{dask:.1f} s (LocalCluster, {args.workers} workers)",
        "ratio": dask / local,
        "identical": "identical" if diff is None else f"no: {diff}",
        "seconds": {"local": local, "distributed": dask},
    }


# ---------------------------------------------------------------- 2. pre-training on two nodes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _users_per_s(out: Path) -> float:
    history = json.loads((out / "reports" / "history.json").read_text())
    return sum(h["users_per_s"] for h in history) / len(history)


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    from ptum import checkpoint

    return load_file(str(checkpoint.live(out) / "model.safetensors"))


def bench_pretrain(args: argparse.Namespace, base: list[str], tmp: Path) -> dict:
    import torch

    proj = _project(args.data, tmp / "pretrain", args.params)
    sets = _sets([*base, f"pretrain.epochs={args.epochs}"])
    outs = {"local": proj / "out-nproc", "distributed": proj / "out-nodes"}
    seconds = {}

    cmd = ["pretrain", "--arch", ARCH, "--out", str(outs["local"]), *sets]
    t0 = time.perf_counter()
    _finish([_start(proj, proj / "nproc.log", *cmd, "--nproc", "2")], [proj / "nproc.log"])
    seconds["local"] = time.perf_counter() - t0
    print(f"pretrain --nproc 2: {seconds['local']:.1f} s", flush=True)

    cmd = ["pretrain", "--arch", ARCH, "--out", str(outs["distributed"]), *sets, "--nproc", "1"]
    endpoint = f"127.0.0.1:{_free_port()}"
    logs = [proj / f"node{r}.log" for r in (0, 1)]
    t0 = time.perf_counter()
    flags = ["--nnodes", "2", "--rdzv-endpoint", endpoint, "--node-rank"]
    nodes = [_start(proj, logs[r], *cmd, *flags, str(r)) for r in (0, 1)]  # together
    _finish(nodes, logs)
    seconds["distributed"] = time.perf_counter() - t0
    print(f"pretrain, 2 nodes on {endpoint}: {seconds['distributed']:.1f} s", flush=True)

    speed = {k: _users_per_s(out) for k, out in outs.items()}
    a, b = _weights(outs["local"]), _weights(outs["distributed"])
    if a.keys() != b.keys():
        same = f"no: tensors {sorted(a.keys() ^ b.keys())} in one only"
    else:
        diff = [k for k in a if not torch.equal(a[k], b[k])]
        same = (
            "bit-identical weights" if not diff else f"no: {len(diff)} tensors differ ({diff[0]})"
        )
    return {
        "engine": f"pre-training across machines ({ARCH}, {args.epochs} epochs)",
        "local": f"{seconds['local']:.1f} s, {speed['local']:.0f} users/s (--nproc 2)",
        "distributed": f"{seconds['distributed']:.1f} s, {speed['distributed']:.0f} users/s "
        "(2 nodes x 1)",
        "ratio": seconds["distributed"] / seconds["local"],
        "identical": same,
        "seconds": seconds,
        "users_per_s": speed,
    }


# ---------------------------------------------------------------- 3. tuning on PostgreSQL


def _postgres() -> tuple[Any, str]:
    """A throw-away PostgreSQL server (pgserver, as tests/tune/conftest.py starts it) and the
    URL of a new database on it, as a user writes it (postgresql://, no driver)."""
    import warnings

    import sqlalchemy

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "XDG_RUNTIME_DIR is not set")
        try:
            import pgserver
        except ImportError as exc:
            sys.exit(f"scale_out: tune needs pgserver (a dev dependency): {exc}")
        # Not under `tmp`: as root, pgserver opens the path's parents to its system user.
        server = pgserver.get_server(
            tempfile.mkdtemp(prefix="ptum-postgres-"), cleanup_mode="delete"
        )
    name = f"ptum_scale_out_{os.getpid()}_{int(time.time())}"
    admin = sqlalchemy.create_engine(_psycopg2(server.get_uri()), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as con:
            con.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    return server, server.get_uri(name)


def _psycopg2(uri: str) -> str:
    """SQLAlchemy 2.1 reads postgresql:// as psycopg 3; ptum installs psycopg2."""
    return uri.replace("postgresql://", "postgresql+psycopg2://", 1)


def _study(url: str) -> dict:
    """The one study at `url`: its trial counts, best value and completed draws."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    (name,) = optuna.get_all_study_names(url)
    study = optuna.load_study(study_name=name, storage=url)
    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if len(study.directions) == 1:
        best = study.best_value
    else:  # ptum's choice on the Pareto front: the best mean of the objectives
        best = max(sum(t.values) / len(t.values) for t in study.best_trials)
    return {
        "complete": states.count(TrialState.COMPLETE),
        "pruned": states.count(TrialState.PRUNED),
        "other": len(states) - len(complete) - states.count(TrialState.PRUNED),
        "best": best,
        "draws": sorted((json.dumps(t.params, sort_keys=True), t.values) for t in complete),
    }


def bench_tune(args: argparse.Namespace, base: list[str], tmp: Path) -> dict:
    tuning = [
        f"tune.n_trials={args.trials}",
        f"tune.epochs={args.tune_epochs}",
        f"tune.finetune_epochs={args.tune_finetune_epochs}",
    ]
    seconds, studies = {}, {}

    proj = _project(args.data, tmp / "tune-sqlite", args.params)
    sets = _sets([*base, *tuning, "tune.storage=sqlite:///data/tune/optuna.db"])
    cmd = ["tune", "--workers", "2", "--out", str(proj / "reports" / "tune"), *sets]
    t0 = time.perf_counter()
    _finish([_start(proj, proj / "tune.log", *cmd)], [proj / "tune.log"])
    seconds["local"] = time.perf_counter() - t0
    studies["local"] = _study(f"sqlite:///{proj / 'data' / 'tune' / 'optuna.db'}")
    print(f"tune --workers 2 on SQLite: {seconds['local']:.1f} s", flush=True)

    server, url = _postgres()
    try:
        machines = [_project(args.data, tmp / f"tune-pg{i}", args.params) for i in (0, 1)]
        sets = _sets([*base, *tuning, f"tune.storage={url}"])
        logs = [m / "tune.log" for m in machines]
        t0 = time.perf_counter()
        workers = [
            _start(m, logs[i], "tune", "--workers", "1", "--worker", str(i), *sets)
            for i, m in enumerate(machines)
        ]
        _finish(workers, logs)
        seconds["distributed"] = time.perf_counter() - t0
        studies["distributed"] = _study(_psycopg2(url))
    finally:
        server.cleanup()
    print(f"tune --worker 0/1 on PostgreSQL: {seconds['distributed']:.1f} s", flush=True)

    def way(s: dict, t: float, how: str) -> str:
        extra = f", {s['other']} surplus/failed" if s["other"] else ""
        return (
            f"{t:.1f} s, {s['complete']} complete + {s['pruned']} pruned{extra}, "
            f"best {s['best']:.4f} ({how})"
        )

    local, distributed = studies["local"]["draws"], studies["distributed"]["draws"]
    alike = sum(d in distributed for d in local)
    return {
        "engine": f"tuning on PostgreSQL ({args.trials} trials)",
        "local": way(studies["local"], seconds["local"], "SQLite, --workers 2"),
        "distributed": way(studies["distributed"], seconds["distributed"], "2 x --worker"),
        "ratio": seconds["distributed"] / seconds["local"],
        "identical": "same trials"
        if local == distributed
        else f"{alike} of {len(local)} complete trials alike (which worker draws which "
        "trial is a race)",
        "seconds": seconds,
        "best": {k: s["best"] for k, s in studies.items()},
    }


# ---------------------------------------------------------------- the data, the machine


def build_tiny(dest: Path, params: Path) -> None:
    """A workspace of the tests' tiny data (tests/conftest.py tiny_pipeline) and a tiny hsa
    pre-trained by `ptum pretrain` with TINY: dest/data/{prepared,tokenized}, dest/models."""
    from ptum.config import PrepareConfig
    from ptum.data.ingest import ingest
    from ptum.data.prepare import prepare
    from ptum.stages.prepare import prepare_options
    from ptum.tokenize import tokenize

    ingest(source="synthetic", path="", out_dir=dest / "raw", size="tiny", seed=7)
    prepare(
        dest / "raw",
        dest / "data" / "prepared",
        prepare_options(PrepareConfig(max_behaviors=20, ctr_train_frac=0.3, ctr_test_frac=0.2)),
    )
    tokenize(
        dest / "data" / "prepared" / "items.parquet",
        dest / "data" / "tokenized",
        vocab_size=300,
        model_type="unigram",
        byte_fallback=True,
        max_tokens=16,
        character_coverage=1.0,
        seed=1,
    )
    shutil.copyfile(params, dest / "params.yaml")
    log = dest / "pretrain.log"
    sets = _sets([*TINY, "pretrain.epochs=2"])
    _finish([_start(dest, log, "pretrain", "--arch", ARCH, *sets)], [log])


def _check_data(data: Path, models: tuple[str, ...]) -> None:
    need = [data / "data" / "prepared" / "sequences.parquet", data / "data" / "tokenized"]
    need += [data / "models" / "pretrain" / m for m in models]
    missing = [str(p) for p in need if not p.exists()]
    if missing:
        sys.exit(f"scale_out: missing {', '.join(missing)}: run `dvc repro` first (or --tiny)")


def _machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.split("\n")
            if line.startswith("Model name")
        ),
        "unknown",
    )
    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run([*git, "status", "--porcelain", "-uno"], capture_output=True, text=True)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load": os.getloadavg(),
        "commit": commit.stdout.strip()
        + (" (uncommitted changes)" if dirty.stdout.strip() else ""),
    }


def _data_line(data: Path, tiny: bool) -> str:
    metrics = data / "data" / "prepared" / "metrics.json"
    where = "tiny synthetic preset (--tiny)" if tiny else str(data)
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        keys = ("users", "labeled_users", "behaviors", "items")
        return f"{where}: " + ", ".join(f"{m[k]:,} {k}" for k in keys if k in m)
    return where


# ---------------------------------------------------------------- main


def _arguments() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog="What each part runs: see the docstring."
    )
    ap.add_argument("--only", choices=("grid", "pretrain", "tune"), help="run one part")
    ap.add_argument(
        "--data",
        type=Path,
        default=ROOT,
        help="a workspace holding data/prepared, data/tokenized and models/pretrain/ARCH "
        "(default: this checkout's, after `dvc repro`)",
    )
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="S.K=V")
    ap.add_argument("--tiny", action="store_true", help="smoke check: tiny data and models")
    ap.add_argument("--repeats", type=int, default=1, help="grid: finetune.repeats")
    ap.add_argument("--workers", type=int, default=2, help="grid: finetune.workers")
    ap.add_argument("--epochs", type=int, default=2, help="pre-training: pretrain.epochs")
    ap.add_argument("--trials", type=int, default=4, help="tuning: tune.n_trials")
    ap.add_argument("--tune-epochs", type=int, default=1, help="tuning: tune.epochs")
    ap.add_argument(
        "--tune-finetune-epochs", type=int, default=2, help="tuning: tune.finetune_epochs"
    )
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    args.params = args.params.resolve()
    args.data = args.data.resolve()
    return args


def main() -> None:
    from ptum.config import load_params

    args = _arguments()
    machine = _machine()  # the load before anything of ours runs
    base = [*(TINY if args.tiny else []), *args.overrides]
    p = load_params(args.params, base)
    parts = [args.only] if args.only else ["grid", "pretrain", "tune"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="ptum-scale-out-") as name:
        tmp = Path(name)
        if args.tiny:
            args.data = tmp / "tiny"
            print("building the tiny workspace ...", flush=True)
            build_tiny(args.data, args.params)
        _check_data(args.data, tuple(p.finetune.demo_models) if "grid" in parts else ())
        header = [
            f"CPU: {machine['cpu']}, {machine['cores']} cores; load average at start "
            + " ".join(f"{v:.2f}" for v in machine["load"]),
            f"commit {machine['commit']}; params {args.params}"
            + (" with --tiny's sizes (TINY)" if args.tiny else "")
            + (f" with {' '.join(args.overrides)}" if args.overrides else ""),
            f"data: {_data_line(args.data, args.tiny)}",
            f"seeds: finetune.seed {p.finetune.seed}, pretrain.seed {p.pretrain.seed}, "
            f"tune.seed {p.tune.seed}; one torch thread per process",
        ]
        print("\n".join(header), flush=True)
        bench = {"grid": bench_grid, "pretrain": bench_pretrain, "tune": bench_tune}
        for part in parts:
            rows.append(bench[part](args, base, tmp))
    print()
    print("\n".join(f"> {line}" for line in header))
    print("> ratio: distributed way's wall seconds / local way's\n")
    print("| engine | local way | distributed way | ratio | identical? |")
    print("| --- | --- | --- | ---: | --- |")
    for r in rows:
        print(
            f"| {r['engine']} | {r['local']} | {r['distributed']} | {r['ratio']:.2f} | "
            f"{r['identical']} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
