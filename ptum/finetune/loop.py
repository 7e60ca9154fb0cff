"""What the Demo and CTR cells (`ptum.finetune.demo`, `ptum.finetune.ctr`) share: the model a
mode starts from, the optimizer's learning rates, the epoch loop with early stopping on
validation, and the result's split sizes.

Modes (paper Tables 2-3):
    scratch   the architecture of the pre-trained checkpoint, randomly initialised, trained end
              to end on the task;
    frozen    "+PTUM (no finetune)": the pre-trained user model is fixed; user (and candidate)
              vectors are computed once and only the head trains;
    finetune  "+PTUM (finetune)": pre-trained weights, everything trains.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ptum.finetune.options import CellOptions
from ptum.models.user_model import UserModel


@dataclass(frozen=True)
class CellRun:
    """A trained cell. `result` is what the grid caches and reports: validation-selected test
    metrics ("valid", "test"), the test predictions ("pred"), "epochs" and the split sizes
    ("n_train", "n_valid", "n_test"); `model` and `head` hold the selected weights."""

    result: dict
    model: UserModel
    head: torch.nn.Module


def split_sizes(train: np.ndarray, valid: np.ndarray, test: np.ndarray) -> dict[str, int]:
    """The result's split sizes: rows (Demo) or impressions (CTR) of each split."""
    return {"n_train": len(train), "n_valid": len(valid), "n_test": len(test)}


def init_model(pretrained: UserModel, mode: str, seed: int) -> UserModel:
    """The user model a cell trains: the pre-trained one (a copy: the original is shared by
    every cell) or, for scratch, its architecture freshly initialised with `seed`."""
    torch.manual_seed(seed)
    if mode == "scratch":
        return UserModel(config=pretrained.config)
    return copy.deepcopy(pretrained)


def optimizer(
    model: UserModel, head: torch.nn.Module, mode: str, opts: CellOptions
) -> torch.optim.Optimizer:
    """AdamW over the head, plus the user model unless frozen (scaled lr when fine-tuning).

    The biased CTR head's per-user and per-item offsets learn at lr * bias_lr_scale: each
    offset sees only its own user's or item's few impressions per epoch, so at the encoder's lr
    it would barely move in the epochs early stopping allows."""
    biases: list[Tensor] = getattr(head, "bias_parameters", lambda: [])()
    ids = {id(p) for p in biases}
    groups: list[dict] = [
        {"params": [p for p in head.parameters() if id(p) not in ids], "lr": opts.lr}
    ]
    if biases:
        groups.append({"params": biases, "lr": opts.lr * opts.bias_lr_scale})
    if mode != "frozen":
        scale = opts.encoder_lr_scale if mode == "finetune" else 1.0
        groups.append({"params": list(model.parameters()), "lr": opts.lr * scale})
    return torch.optim.AdamW(groups, lr=opts.lr, weight_decay=opts.weight_decay)


def _state(*modules: torch.nn.Module) -> list[dict[str, Tensor]]:
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in modules]


class BestOnValid:
    """Early stopping: keeps the weights of the best validation score, and what the caller
    measured with them (`kept`: None until a score improves), counts bad epochs."""

    def __init__(self, patience: int, *modules: torch.nn.Module):
        self.patience, self.modules = patience, modules
        self.best, self.bad = -np.inf, 0
        self.state = _state(*modules)
        self.kept: Any = None

    def update(self, score: float, kept: Any = None) -> bool:
        """Record an epoch's validation score (and `kept`, the validation result it comes
        from); True when training should stop."""
        if score > self.best:
            self.best, self.bad, self.state, self.kept = score, 0, _state(*self.modules), kept
            return False
        self.bad += 1
        return self.bad >= self.patience

    def restore(self) -> None:
        for m, st in zip(self.modules, self.state):
            m.load_state_dict(st)


def fit(
    model: UserModel,
    head: torch.nn.Module,
    opt: torch.optim.Optimizer,
    stopper: BestOnValid,
    batches: Callable[[], Iterable[np.ndarray]],
    loss: Callable[[np.ndarray], Tensor],
    validate: Callable[[], tuple[float, Any]],
    max_epochs: int,
    frozen: bool,
) -> int:
    """Train epochs of `batches()` (drawn anew each epoch) with `loss` until `stopper` says the
    validation score stopped improving, or `max_epochs`; restore the best weights and return
    the number of epochs trained. `validate()`: (the epoch's validation score, the validation
    result the stopper keeps if it is the best, so the caller need not score again with the
    restored weights). A frozen user model stays in eval mode."""
    epochs = 0
    for epoch in range(max_epochs):
        model.train(not frozen), head.train()
        for batch in batches():
            value = loss(batch)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
        epochs = epoch + 1
        if stopper.update(*validate()):
            break
    stopper.restore()
    return epochs
