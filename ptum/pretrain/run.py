"""Pre-train one architecture: load its inputs, train, write its metrics and history.

The corpora, model config and (hybrid encoder) item-id vocabulary come from
`ptum.pretrain.setup.load_inputs`, which each tuning trial calls too. The options are
`TrainOptions`, which the stage (`ptum.stages.pretrain`) builds from params.yaml.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ptum.pretrain.options import TrainOptions, pick_device
from ptum.pretrain.setup import load_inputs
from ptum.pretrain.train import TIMING_KEYS, pretrain


def pretrain_arch(
    arch: str,
    opts: TrainOptions,
    *,
    behavior_encoder: str,
    model_sizes: Mapping[str, int | float],
    device: str,
    params: Mapping[str, Any],
    prepared: Path,
    tokenized: Path,
    max_behaviors: int,
    out_dir: Path,
    report_dir: Path,
    threads: int = 1,
    pool: Sequence[str] | None = None,
) -> dict:
    """Pre-train one architecture into checkpoint `out_dir`; return the last epoch's metrics.
    As a rank (WORLD_SIZE > 1) joins the process group.

    behavior_encoder: "" = the architecture's own; model_sizes: word_dim, dim, ...; device:
    "auto" | "cpu" | "cuda[:N]"; params: recorded in the checkpoint's meta as pretrain_params.
    With `opts.deterministic`, `threads` torch threads and deterministic kernels: two runs
    write byte-equal checkpoints. pool: pre-train on these training users only
    (`ptum.data.pool`; None: all). Per-epoch timings go to report_dir/history.json and
    metrics.json, never into out_dir.
    """
    torch_device = _join_process_group(device)
    inputs = load_inputs(
        prepared,
        tokenized,
        max_behaviors,
        arch=arch,
        behavior_encoder=behavior_encoder,
        model_sizes=model_sizes,
        pool=pool,
    )
    meta = {**inputs.meta, "pretrain_params": dict(params)}
    timings: dict[int, dict] = {}

    def keep_timing(epoch: int, _model, metrics: dict) -> None:
        timings[epoch] = {k: metrics[k] for k in TIMING_KEYS if k in metrics}

    final = pretrain(
        train=inputs.train,
        valid=inputs.valid,
        config=inputs.config,
        opts=opts,
        out_dir=out_dir,
        meta=meta,
        device=torch_device,
        id_vocab=inputs.id_vocab,
        on_epoch=keep_timing,
        threads=threads,
    )
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        _write_reports(arch, opts, out_dir, report_dir, timings)
    if dist.is_initialized():
        dist.destroy_process_group()
    return final


def _join_process_group(device_name: str) -> torch.device:
    """The device to train on; as a rank (WORLD_SIZE > 1) first joins the process group
    (NCCL on GPU, each process on its LOCAL_RANK's GPU; gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
        if device.type == "cuda":
            device = pick_device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return device


def _write_reports(
    arch: str, opts: TrainOptions, out_dir: Path, report_dir: Path, timings: dict[int, dict]
) -> None:
    """report_dir/history.json (the checkpoint's history with timings) and metrics.json (its
    last epoch, the chance accuracy 1 / (p + 1) and the epoch count)."""
    from ptum.checkpoint import read_meta

    history = _with_timings(read_meta(out_dir)["history"], timings, report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    chance = 1.0 / (opts.p + 1)
    metrics = {
        "architecture": arch,
        "chance_acc": chance,
        "epochs": len(history),
        **{k: v for k, v in (history[-1] if history else {}).items() if k != "epoch"},
    }
    (report_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    (report_dir / "history.json").write_text(json.dumps(history, indent=1) + "\n")


def _with_timings(history: list[dict], timings: dict[int, dict], report_dir: Path) -> list[dict]:
    """The checkpoint's history with each epoch's timing: measured in this run, or (epochs run
    before an interruption) taken from the report the earlier run wrote."""
    earlier: dict[int, dict] = {}
    path = report_dir / "history.json"
    if path.is_file():
        try:
            for h in json.loads(path.read_text()):
                earlier[h["epoch"]] = {k: h[k] for k in TIMING_KEYS if k in h}
        except (ValueError, KeyError, TypeError):
            earlier = {}  # a report is rewritten, never trusted for anything but timings
    return [h | timings.get(h["epoch"], earlier.get(h["epoch"], {})) for h in history]
