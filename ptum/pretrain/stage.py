"""Stage `pretrain`: load the corpus, build the model config, train, write metrics and plots.

With `pretrain.behavior_encoder: hybrid` the architecture's own text encoder is combined with an
item-id embedding whose vocabulary (items with >= id_min_count training behaviors) is built here
from the training users and saved with the checkpoint.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch.distributed as dist

from ptum.config import PretrainConfig, to_dict
from ptum.models.behavior import ID_MIN_COUNT
from ptum.models.user_model import ARCHITECTURES, ModelConfig
from ptum.pretrain.data import Corpus, file_digest, load_corpus, tokenizer_digest
from ptum.pretrain.id_vocab import IdVocab, build_id_vocab, item_table_digest, item_texts
from ptum.pretrain.train import TIMING_KEYS, TrainOptions, pick_device, pretrain


def train_options(cfg: PretrainConfig, tuned: dict | None = None) -> TrainOptions:
    fields = {k: v for k, v in to_dict(cfg).items() if k in TrainOptions.__dataclass_fields__}
    if tuned:
        fields.update({k: v for k, v in tuned.items() if k in ("k", "lam", "p", "lr")})
    return TrainOptions(**fields)


def model_config(
    cfg: PretrainConfig,
    arch: str,
    *,
    vocab_size: int,
    max_tokens: int,
    max_behaviors: int,
    num_items: int,
    id_vocab: int = 0,
) -> ModelConfig:
    """The model of `arch` with pretrain.model's sizes; id_vocab = rows of the hybrid encoder's
    id embedding (`IdVocab.size`), ignored by the other encoders."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(ARCHITECTURES)}")
    hybrid = {"id_vocab": id_vocab} if cfg.behavior_encoder == "hybrid" else {}
    return ModelConfig.for_architecture(
        arch,
        behavior_encoder=cfg.behavior_encoder,
        vocab_size=vocab_size,
        max_tokens=max_tokens,
        max_behaviors=max_behaviors,
        num_items=num_items,
        **hybrid,
        **to_dict(cfg.model),
    )


def corpus_id_vocab(prepared: Path, train: Corpus, min_count: int) -> IdVocab:
    """The id vocabulary of the pre-training corpus `train` (training users only)."""
    return build_id_vocab(train.items, item_texts(prepared), train.tokens, min_count)


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
    train = load_corpus(prepared, tokenized, "train", max_behaviors)
    valid = load_corpus(prepared, tokenized, "valid", max_behaviors)
    tok_report = json.loads((tokenized / "report.json").read_text())
    sizes = dict(
        vocab_size=int(tok_report["vocab_size"]),
        max_tokens=int(train.tokens.shape[1]),
        max_behaviors=max_behaviors,
        num_items=train.num_items + 1,
    )
    id_vocab = None
    if cfg.behavior_encoder == "hybrid":
        min_count = to_dict(cfg.model).get("id_min_count", ID_MIN_COUNT)
        id_vocab = corpus_id_vocab(prepared, train, min_count)
    config = model_config(cfg, arch, **sizes, id_vocab=id_vocab.size if id_vocab else 0)
    tokens = train.tokens
    if config.behavior_encoder == "id":
        # The id encoder reads the item id itself as its single "token".
        import torch

        ids = torch.arange(train.num_items + 1).unsqueeze(1)
        train = type(train)(**{**train.__dict__, "tokens": ids})
        valid = type(valid)(**{**valid.__dict__, "tokens": ids})
    meta = {
        "architecture": arch,
        "tokenizer_sha256": tokenizer_digest(tokenized),
        "data_sha256": file_digest(
            [prepared / "sequences.parquet", prepared / "users.parquet", tokenized / "tokens.npy"]
        ),
        "max_behaviors": max_behaviors,
        "pretrain_params": to_dict(cfg),
        # What item id i means; fine-tuning refuses the checkpoint against another tokens.npy.
        "item_table_sha256": item_table_digest(tokens),
    }
    timings: dict[int, dict] = {}

    def keep_timing(epoch: int, _model, metrics: dict) -> None:
        timings[epoch] = {k: metrics[k] for k in TIMING_KEYS if k in metrics}

    final = pretrain(
        train=train,
        valid=valid,
        config=config,
        opts=opts,
        out_dir=out_dir,
        meta=meta,
        device=device,
        id_vocab=id_vocab,
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
