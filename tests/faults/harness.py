"""The fault-injection suite's tools: throw-away projects, `ptum` runs that are killed at a
chosen point or under a file-size limit, flipped bytes, and comparisons of what stages wrote.

Everything goes through the command line (`python -m ptum STAGE` in a project directory), so
the suite tests what a user sees and does not depend on ptum's internals. Kill points come from
`shim/sitecustomize.py`, which counts the file operations a run makes under its project
(opens for writing, renames, fsyncs, removals): a reference run logs them, and a faulty run is
killed with SIGKILL just before the N-th one; or a run is killed after a delay.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
SHIM = Path(__file__).resolve().parent / "shim"
ARCH = "hsa"
PRETRAIN = ("pretrain", "--arch", ARCH)
CKPT = Path("models/pretrain") / ARCH

# Tiny everything (the QUICK preset's sizes, smaller grids): each stage runs in seconds on a core.
PARAMS: dict = {
    "data": {"source": "synthetic", "size": "tiny", "seed": 7},
    "prepare": {"max_behaviors": 20, "ctr_train_frac": 0.3, "ctr_test_frac": 0.2},
    "tokenize": {"vocab_size": 400},
    "pretrain": {
        "architectures": [ARCH],
        "model": {
            "word_dim": 16,
            "dim": 16,
            "heads": 2,
            "head_dim": 8,
            "attn_hidden": 16,
            "dropout": 0.0,
            "layers": 1,
        },
        "batch_size": 16,
        "epochs": 2,
        "deterministic": True,
    },
    "finetune": {
        "demo_models": [ARCH],
        "modes": ["scratch", "frozen"],
        "ratios": [0.2],
        "repeats": 1,
        "max_epochs": 1,
        "class_weights": ["none"],
        "bootstrap": 100,
        "workers": 1,
        "head_hidden": 16,
    },
    # A killed trial goes stale after 2 s (not 3 minutes), so a rerun can fail and retry it.
    "tune": {
        "arch": ARCH,
        "n_trials": 2,
        "epochs": 1,
        "finetune_epochs": 1,
        "prune_startup_trials": 1,
        "heartbeat_interval": 1,
        "grace_period": 2,
    },
    "export": {"heads": False},
}
GRACE_PERIOD = PARAMS["tune"]["grace_period"]

# Report keys that measure time, not results.
TIMING_KEYS = ("seconds", "epoch_seconds", "users_per_s")


@dataclass
class Run:
    """One finished (or killed) `ptum` run."""

    args: tuple[str, ...]
    rc: int  # -9: killed by SIGKILL
    stdout: str
    stderr: str
    seconds: float

    def explain(self) -> str:
        return f"ptum {' '.join(self.args)}: rc={self.rc}\n{self.stderr[-3000:]}"


def new_project(path: Path) -> Path:
    """An empty project directory holding the tiny params.yaml."""
    path.mkdir(parents=True)
    (path / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    return path


def copy_project(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _limit_file_size(limit: int) -> None:
    """preexec_fn: files may not grow past `limit` bytes; a write beyond fails with EFBIG
    instead of killing the process with SIGXFSZ (a full disk, as the process sees it)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def ptum(
    proj: Path,
    *args: str,
    kill_at: int = 0,
    kill_after: float | None = None,
    log: Path | None = None,
    max_file_size: int | None = None,
    timeout: float = 600,
) -> Run:
    """Run `python -m ptum *args` in `proj` with one torch thread.

    kill_at: SIGKILL just before the kill_at-th file operation (see shim/sitecustomize.py);
    kill_after: SIGKILL after this many seconds; log: write the run's file operations there;
    max_file_size: RLIMIT_FSIZE in bytes (disk full).
    """
    env = dict(os.environ, PYTHONPATH=f"{SHIM}{os.pathsep}{ROOT}", OMP_NUM_THREADS="1")
    env.pop("PTUM_DEBUG", None)
    if kill_at or log:
        env["PTUM_FAULT_ARM"] = "1"
        env["PTUM_FAULT_KILL_AT"] = str(kill_at)
        env["PTUM_FAULT_LOG"] = str(log or "")
    t0 = time.monotonic()
    p = subprocess.Popen(
        [sys.executable, "-m", "ptum", *args],
        cwd=proj,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=(lambda: _limit_file_size(max_file_size)) if max_file_size else None,
    )
    try:
        out, err = p.communicate(timeout=kill_after if kill_after is not None else timeout)
    except subprocess.TimeoutExpired:
        if kill_after is None:
            p.kill()
            raise
        p.send_signal(signal.SIGKILL)
        out, err = p.communicate(timeout=60)
    return Run(tuple(args), p.returncode, out, err, time.monotonic() - t0)


def events(log: Path) -> list[tuple[int, str, str]]:
    """The file operations a logged run made: (index, operation, path under the project)."""
    rows = [line.split("\t") for line in log.read_text().splitlines()]
    return [(int(i), op, path) for i, op, path in rows]


@dataclass
class Ref:
    """A project after one uninterrupted stage run, with that run's file operations."""

    proj: Path
    events: list[tuple[int, str, str]]
    seconds: float


def reference(proj: Path, *args: str) -> Ref:
    """Run a stage uninterrupted in `proj`, logging its file operations."""
    log = proj.parent / f"{proj.name}.events"
    run = ptum(proj, *args, log=log)
    assert run.rc == 0, run.explain()
    return Ref(proj, events(log), run.seconds)


def flip_byte(path: Path, mask: int = 0x01) -> int:
    """XOR one byte of `path` (at a position seeded by its name) with `mask`; returns it.
    mask 0x01 keeps ASCII text ASCII; 0x80 makes it invalid UTF-8."""
    data = bytearray(path.read_bytes())
    pos = random.Random(path.name).randrange(len(data))
    data[pos] ^= mask
    path.write_bytes(bytes(data))
    return pos


def flip_positions(path: Path, n: int = 3) -> list[int]:
    """The first and last byte of `path` and `n` others drawn with a seed of its name."""
    size = path.stat().st_size
    drawn = random.Random(f"flips:{path.name}").sample(range(size), min(n, size))
    return sorted({0, size - 1, *drawn})


def flip_at(path: Path, pos: int, mask: int = 0x01) -> None:
    """XOR the byte at `pos` with `mask` (twice: the file as it was)."""
    data = bytearray(path.read_bytes())
    data[pos] ^= mask
    path.write_bytes(bytes(data))


def tree(directory: Path) -> dict[str, str]:
    """SHA-256 of every file under `directory`, by relative path."""
    return {
        str(f.relative_to(directory)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(directory.rglob("*"))
        if f.is_file()
    }


def without_timings(obj: object) -> object:
    """A report without its wall-clock measurements (equal runs differ only there)."""
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [without_timings(v) for v in obj]
    return obj


def report(path: Path) -> object:
    return without_timings(json.loads(path.read_text()))


def error_line(run: Run, stage: str) -> str:
    """The one-line error of a run that refused (exit 2): no traceback, last line
    `ptum STAGE: error: ...`."""
    assert run.rc == 2, run.explain()
    assert "Traceback" not in run.stderr, run.explain()
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ptum {stage}: error: "), run.explain()
    return last


def rerun(proj: Path, *args: str) -> Run:
    """Run a stage to completion (it must succeed)."""
    run = ptum(proj, *args)
    assert run.rc == 0, run.explain()
    return run


def assert_pretrain_equal(proj: Path, ref: Path) -> None:
    """Byte-equal checkpoint directories; equal reports but for their timings."""
    assert tree(proj / CKPT) == tree(ref / CKPT)
    for name in ("history.json", "metrics.json"):
        path = Path("reports/pretrain") / ARCH / name
        assert report(proj / path) == report(ref / path), name
