"""Resuming pre-training: where a run stands (its position) and loading it back from a
checkpoint, with the checks that the checkpoint's position is consistent."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ptum import checkpoint
from ptum.models.id_vocab import IdVocab
from ptum.models.user_model import ModelConfig, UserModel
from ptum.pretrain.options import TrainOptions


def check_position(saved: dict[str, Any], steps_per_epoch: int, opts: TrainOptions) -> None:
    """A checkpoint's epoch/step must agree with its step count and its history."""
    epoch, step = saved.get("epoch"), saved.get("step_in_epoch")
    ok = (
        isinstance(epoch, int)
        and isinstance(step, int)
        and 0 <= epoch <= opts.epochs
        and 0 <= step < steps_per_epoch
        and saved.get("global_step") == epoch * steps_per_epoch + step
        and len(saved.get("history", ())) == epoch
    )
    if not ok:
        raise checkpoint.CorruptCheckpoint(
            f"checkpoint position epoch {epoch} step {step} (global step "
            f"{saved.get('global_step')}, {len(saved.get('history', ()))} epochs of history) "
            f"is inconsistent with {steps_per_epoch} steps per epoch; remove the checkpoint "
            "directory and re-run pre-training"
        )


@dataclass
class Position:
    """Where training stands, as a checkpoint records it besides weights and optimiser state."""

    epoch: int = 0
    step_in_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    # The running sums of the epoch in progress, saved with a mid-epoch checkpoint so that a
    # resumed epoch reports the same training loss as an uninterrupted one.
    partial: dict[str, Any] = field(default_factory=lambda: {"seen": 0, "sums": {}})


def load_position(
    out_dir: Path,
    model: UserModel,
    opt: torch.optim.Optimizer,
    meta: dict[str, Any],
    config: ModelConfig,
    opts: TrainOptions,
    id_vocab: IdVocab | None,
    steps_per_epoch: int,
    log: Callable[[str], None],
) -> Position:
    """Load the checkpoint in out_dir into `model` and `opt` and return its position; a
    checkpoint of other options or data is ignored (training starts over at epoch 0)."""
    loaded = checkpoint.load(
        out_dir,
        tokenizer_sha256=meta.get("tokenizer_sha256"),
        expect_config=config,
        with_optimizer=True,
        id_vocab_sha256=id_vocab.sha256 if id_vocab is not None else None,
    )
    saved = loaded.meta
    if saved.get("train_options") != asdict(opts) or saved.get("data_sha256") != meta.get(
        "data_sha256"
    ):
        log(f"{out_dir}: checkpoint is from other options or data; starting over")
        return Position()
    check_position(saved, steps_per_epoch, opts)
    model.load_state_dict(loaded.model.state_dict())
    if loaded.optimizer_tensors is not None:
        checkpoint.load_optimizer(opt, loaded.optimizer_tensors, saved["optimizer_scalars"])
    pos = Position(saved["epoch"], saved["step_in_epoch"], saved["history"])
    pos.partial = saved.get("partial_epoch", pos.partial)
    log(f"resuming from epoch {pos.epoch} step {pos.step_in_epoch} ({loaded.path})")
    return pos
