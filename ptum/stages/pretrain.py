"""Stage `pretrain@ARCH`: pre-train one user model with MBP + NBP (models/pretrain/ARCH).

With more than one process (`pretrain.processes`, `ptum pretrain --nproc N`) the same `ptum`
command runs once per data-parallel rank, started by `ptum.stages.launch` on this machine, or by
`ptum.stages.multinode` on each of several machines (`--nnodes N --node-rank R --rdzv-endpoint
HOST:PORT`); each rank then comes back here with WORLD_SIZE set and joins the process group in
the library.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ptum import paths
from ptum.config import Params, PretrainConfig, to_dict
from ptum.hashing import sha256_bytes
from ptum.pretrain.options import TrainOptions
from ptum.stages import launch, multinode
from ptum.stages.errors import reading


def train_options(c: PretrainConfig, tuned: Mapping[str, Any] | None = None) -> TrainOptions:
    """The loop's options from the `pretrain:` section; `tuned` (k, lam, p, lr from the tune
    stage's best_params.json) replaces those keys."""
    opts = TrainOptions(
        mbp=c.mbp,
        nbp=c.nbp,
        k=c.k,
        lam=c.lam,
        p=c.p,
        negatives=c.negatives,
        lr=c.lr,
        weight_decay=c.weight_decay,
        batch_size=c.batch_size,
        epochs=c.epochs,
        seed=c.seed,
        grad_clip=c.grad_clip,
        deterministic=c.deterministic,
    )
    return replace(opts, **tuned) if tuned else opts


def report_dir(arch: str, out: Path | None) -> Path:
    """Where history.json and metrics.json go: beside a side experiment's `out`, else
    reports/pretrain/ARCH (the stage's, which `out` must not overwrite)."""
    return out / "reports" if out is not None else paths.pretrain_report(arch)


def rendezvous_id(p: Params, arch: str, out: Path | None) -> str:
    """The rendezvous id of a run over several machines: a digest of what they must agree on
    (the architecture, the output path as given, the `pretrain:` section less `processes`, a
    choice of each machine, and prepare.max_behaviors). Node 0 refuses a machine with another."""
    agreed = {
        "arch": arch,
        "out": str(out or paths.pretrain_model(arch)),
        "pretrain": {k: v for k, v in to_dict(p.pretrain).items() if k != "processes"},
        "max_behaviors": p.prepare.max_behaviors,
    }
    return f"ptum-pretrain-{sha256_bytes(json.dumps(agreed, sort_keys=True).encode())[:16]}"


def run(
    p: Params,
    *,
    arch: str | None = None,
    prepared: Path = paths.PREPARED,
    out: Path | None = None,
    nproc: int = 0,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
    command: Sequence[str] = (),
) -> dict:
    """Pre-train `arch` (default: the first of pretrain.architectures); return its metrics.

    `nproc` (0: pretrain.processes) > 1 starts `ptum *command` in that many local processes;
    `nnodes` > 1 starts `nproc` of them on this machine, node `node_rank` of `nnodes` meeting at
    `rdzv_endpoint` (node 0 writes the checkpoint and reports). Neither when this already is
    one of them (WORLD_SIZE set, also by a user's own torchrun). With `pretrain.use_tuned`,
    k / lam / p / lr come from the tune stage's best_params.json.
    """
    arch = arch or p.pretrain.architectures[0]
    report = report_dir(arch, out)
    procs = nproc or p.pretrain.processes
    if "WORLD_SIZE" in os.environ:
        multinode.die_with_agent()  # a rank of `run_nodes` dies with it
    elif multinode.check_nodes(nnodes, node_rank, rdzv_endpoint) is not None:
        multinode.run_nodes(
            ["-m", "ptum", *command],
            nnodes=nnodes,
            node_rank=node_rank,
            endpoint=str(rdzv_endpoint),
            nproc=procs,
            run_id=rendezvous_id(p, arch, out),
        )
        if node_rank != 0:  # node 0's rank 0 wrote the checkpoint and reports, over there
            return {"architecture": arch, "node_rank": node_rank, "nnodes": nnodes}
        return json.loads((report / "metrics.json").read_text(encoding="utf-8"))
    elif procs > 1:
        launch.run_local(["-m", "ptum", *command], procs)
        return json.loads((report / "metrics.json").read_text(encoding="utf-8"))
    ckpt = out or paths.pretrain_model(arch)
    with reading(prepared, paths.TOKENIZED, ckpt, paths.BEST_PARAMS):
        return pretrain_one(
            p.pretrain,
            arch,
            prepared=prepared,
            tokenized=paths.TOKENIZED,
            max_behaviors=p.prepare.max_behaviors,
            out_dir=ckpt,
            report_dir=report,
            tuned_path=paths.BEST_PARAMS,
        )


def pretrain_one(
    c: PretrainConfig,
    arch: str,
    *,
    prepared: Path,
    tokenized: Path,
    max_behaviors: int,
    out_dir: Path,
    report_dir: Path,
    tuned_path: Path | None = None,
    pool: Sequence[str] | None = None,
) -> dict:
    """Pre-train `arch` as the `pretrain:` section `c` says; with `c.use_tuned`, k / lam / p / lr
    come from `tuned_path` (the tune stage's best_params.json). pool: these training users
    only (the regime stage; None: all)."""
    from ptum.pretrain.run import pretrain_arch
    from ptum.pretrain.tuned import read_tuned

    tuned = read_tuned(tuned_path, max_behaviors) if c.use_tuned else None
    return pretrain_arch(
        arch,
        train_options(c, tuned),
        behavior_encoder=c.behavior_encoder,
        model_sizes=to_dict(c.model),
        device=c.device,
        params=to_dict(c),
        prepared=prepared,
        tokenized=tokenized,
        max_behaviors=max_behaviors,
        out_dir=out_dir,
        report_dir=report_dir,
        pool=pool,
    )
