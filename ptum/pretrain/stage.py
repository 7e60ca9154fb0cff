"""Stage `pretrain`: the options from params.yaml (or the tuned ones), train, write metrics and plots.

The corpora, model config and (hybrid encoder) item-id vocabulary come from
`ptum.pretrain.setup.load_inputs`, which each tuning trial calls too.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch.distributed as dist

from ptum.config import PretrainConfig, to_dict
from ptum.pretrain.setup import corpus_id_vocab, load_inputs
from ptum.pretrain.train import TIMING_KEYS, TrainOptions, pick_device, pretrain

__all__ = ["corpus_id_vocab", "run_stage", "train_options"]


def train_options(cfg: PretrainConfig, tuned: dict | None = None) -> TrainOptions:
    fields = {k: v for k, v in to_dict(cfg).items() if k in TrainOptions.__dataclass_fields__}
    if tuned:
        fields.update({k: v for k, v in tuned.items() if k in ("k", "lam", "p", "lr")})
    return TrainOptions(**fields)


def run_stage(
    cfg: PretrainConfig,
    arch: str,
    *,
    prepared: Path,
    tokenized: Path,
    max_behaviors: int,
    out_dir: Path,
    report_dir: Path,
    tuned_path: Path | None = None,
    deterministic: bool | None = None,
    threads: int = 1,
) -> dict:
    """Pre-train one architecture. Under torchrun (WORLD_SIZE > 1) joins the process group.

    `deterministic` (None: the config's `pretrain.deterministic` where it has one, else off)
    runs with deterministic kernels and `threads` torch threads: two runs write byte-equal
    checkpoints. Per-epoch timings go to report_dir/history.json and metrics.json, never into
    out_dir.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(cfg.device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
        if device.type == "cuda":
            device = pick_device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    tuned = None
    if cfg.use_tuned:
        if tuned_path is None or not tuned_path.exists():
            raise FileNotFoundError(
                f"pretrain.use_tuned is true but {tuned_path} does not exist; "
                "run the tune stage first"
            )
        tuned = json.loads(tuned_path.read_text())
    opts = train_options(cfg, tuned)
    if deterministic is not None:
        opts = replace(opts, deterministic=deterministic)
    inputs = load_inputs(
        prepared,
        tokenized,
        max_behaviors,
        arch=arch,
        behavior_encoder=cfg.behavior_encoder,
        model_sizes=to_dict(cfg.model),
    )
    meta = {**inputs.meta, "pretrain_params": to_dict(cfg)}
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
        device=device,
        id_vocab=inputs.id_vocab,
        on_epoch=keep_timing,
        threads=threads,
    )
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
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
    if dist.is_initialized():
        dist.destroy_process_group()
    return final


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
