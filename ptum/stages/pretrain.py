"""Stage `pretrain@ARCH`: pre-train one user model with MBP + NBP (models/pretrain/ARCH).

With more than one process (`pretrain.processes`, `ptum pretrain --nproc N`) the same `ptum`
command runs once per data-parallel rank, started by `ptum.stages.launch` on this machine; each
rank then comes back here with WORLD_SIZE set and joins the process group in the library.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from ptum import paths
from ptum.config import Params
from ptum.stages import launch
from ptum.stages.errors import reading


def report_dir(arch: str, out: Path | None) -> Path:
    """Where history.json and metrics.json go: beside a side experiment's `out`, else
    reports/pretrain/ARCH (the stage's, which `out` must not overwrite)."""
    return out / "reports" if out is not None else paths.pretrain_report(arch)


def run(
    p: Params,
    *,
    arch: str | None = None,
    prepared: Path = paths.PREPARED,
    out: Path | None = None,
    nproc: int = 0,
    command: Sequence[str] = (),
) -> dict:
    """Pre-train `arch` (default: the first of pretrain.architectures); return its metrics.

    `nproc` (0: pretrain.processes) > 1 starts `ptum *command` in that many local processes,
    unless this already is one of them (WORLD_SIZE set, also by a user's own torchrun).
    """
    arch = arch or p.pretrain.architectures[0]
    report = report_dir(arch, out)
    procs = nproc or p.pretrain.processes
    if procs > 1 and "WORLD_SIZE" not in os.environ:
        launch.run_local(["-m", "ptum", *command], procs)
        return json.loads((report / "metrics.json").read_text(encoding="utf-8"))
    from ptum.pretrain.stage import run_stage

    ckpt = out or paths.pretrain_model(arch)
    with reading(prepared, paths.TOKENIZED, ckpt, paths.BEST_PARAMS):
        return run_stage(
            p.pretrain,
            arch,
            prepared=prepared,
            tokenized=paths.TOKENIZED,
            max_behaviors=p.prepare.max_behaviors,
            out_dir=ckpt,
            report_dir=report,
            tuned_path=paths.BEST_PARAMS,
        )
