"""Stage `pretrain`: the options from params.yaml (or the tuned ones), train, write metrics and plots.

The corpora, model config and (hybrid encoder) item-id vocabulary come from
`ptum.pretrain.setup.load_inputs`, which each tuning trial calls too.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from ptum.config import PretrainConfig, to_dict
from ptum.pretrain.options import TrainOptions, pick_device
from ptum.pretrain.setup import corpus_id_vocab, load_inputs
from ptum.pretrain.train import TIMING_KEYS, pretrain

__all__ = ["TUNED_KEYS", "corpus_id_vocab", "read_tuned", "run_stage", "train_options"]


# What `pretrain.use_tuned: true` takes from the tune stage's best_params.json (dvc.yaml's
# pretrain stage declares exactly these keys of that file; tests/tune/test_use_tuned.py).
TUNED_KEYS = ("k", "lam", "p", "lr")


def train_options(cfg: PretrainConfig, tuned: dict | None = None) -> TrainOptions:
    """The loop's options from pretrain's section, with TUNED_KEYS taken from `tuned` if given."""
    fields = {k: v for k, v in to_dict(cfg).items() if k in TrainOptions.__dataclass_fields__}
    if tuned:
        fields.update({k: tuned[k] for k in TUNED_KEYS if k in tuned})
    return TrainOptions(**fields)


def read_tuned(path: Path | None) -> dict[str, int | float]:
    """k, lam, p, lr from the tune stage's best_params.json; a clear error when it is missing or
    lacks one of them."""
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"pretrain.use_tuned is true but {path} does not exist; run the tune stage first "
            "(`dvc repro tune` or `ptum tune`), or set pretrain.use_tuned: false"
        )
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not JSON ({e}); rerun the tune stage") from e
    if isinstance(data, dict) and data.get("available") is False:
        raise ValueError(
            f"pretrain.use_tuned is true but {path} holds no tuned values: the tune stage had "
            f"no task to score trials on ({data.get('why_not')}); set pretrain.use_tuned: false"
        )
    for key in TUNED_KEYS:
        value = data.get(key) if isinstance(data, dict) else None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(
                f"{path}: key {key!r} is {value!r}, expected a number; rerun the tune stage"
            )
    return {key: data[key] for key in TUNED_KEYS}


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
    out_dir. With `pretrain.use_tuned`, k / lam / p / lr come from `tuned_path` (the tune
    stage's best_params.json, see `read_tuned`).
    """
    device = _join_process_group(cfg.device)
    opts = train_options(cfg, read_tuned(tuned_path) if cfg.use_tuned else None)
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
        _write_reports(arch, opts, out_dir, report_dir, timings)
    if dist.is_initialized():
        dist.destroy_process_group()
    return final


def _join_process_group(device_name: str) -> torch.device:
    """The device to train on; under torchrun (WORLD_SIZE > 1) first joins the process group
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
