"""Downstream heads on top of user vectors: CTR scoring and demographic classification.

Both are plain tensor-only `nn.Module`s so that fine-tuning trains them and `ptum.export` turns
them into ONNX without glue code:

    CtrHead   user (B, D), candidate (B, D) -> click probability sigmoid(W user . candidate + b)
    BiasedCtrHead  the same plus a user bias and a per-item candidate bias that falls back to
              the item's popularity before the window (finetune.ctr_scoring: bias)
    DemoHead  user (B, D) -> class probabilities (B, C): Linear(D, hidden) -> ReLU -> Linear(C)
              -> softmax. Train on `DemoHead.logits` with F.cross_entropy (stable); serve
              `forward` (probabilities).

A fine-tuned demographic head is stored next to the user-model checkpoint as
`demo_<label>.safetensors` (weights) + `demo_<label>.json` (dim, hidden, classes) with
`save_demo_head`; `ptum.export.export` picks up every such pair it finds there.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

_LABEL = re.compile(r"[A-Za-z0-9_.-]+")


class CtrHead(nn.Module):
    """Dot-product click scoring (official PTUM code: sigmoid(user . candidate)).

    With `dim`, the user vector first goes through a learned linear map initialised to the
    identity, plus a scalar bias: at initialisation this is exactly the paper's dot product, and
    it gives the "+PTUM (no finetune)" mode something to train when the user model and the
    candidate (behavior) encoder are frozen. Without `dim` it is the bare dot product.
    """

    def __init__(self, *, dim: int | None = None) -> None:
        super().__init__()
        self.proj: nn.Linear | None = None
        if dim is not None:
            self.proj = nn.Linear(dim, dim)
            with torch.no_grad():
                self.proj.weight.copy_(torch.eye(dim))
                self.proj.bias.zero_()
            self.bias = nn.Parameter(torch.zeros(()))

    def logits(self, user: Tensor, candidate: Tensor) -> Tensor:
        """(B, D), (B, D) -> (B,) click logits (the training path, for BCE-with-logits)."""
        if self.proj is None:
            return (user * candidate).sum(dim=-1)
        return (self.proj(user) * candidate).sum(dim=-1) + self.bias

    def forward(self, user: Tensor, candidate: Tensor) -> Tensor:
        """(B, D) user vectors, (B, D) candidate behavior vectors -> (B,) click probability."""
        return torch.sigmoid(self.logits(user, candidate))


class BiasedCtrHead(nn.Module):
    """CTR scoring with biases: W user . candidate + user bias + candidate bias.

        logit = (W u) . c + (w . u + b + user_bias[user]) + item_bias[item] + a * log_pop(item)

    The candidate bias is learned per item; an item with no training impression keeps a zero
    learned bias (its embedding row gets no gradient, and decoupled weight decay keeps zero at
    zero), so its bias falls back to `a * log_popularity`, the label-free popularity of the item
    in the behaviors before the window. The user bias likewise: a learned per-user offset (how
    readily this user clicks, which the behavior history alone does not show) for users with
    training impressions, plus a linear function of the user vector that exists for new users
    too. At initialisation everything but the identity-initialised W is zero: the score starts
    as the paper's dot product.
    """

    def __init__(self, *, dim: int, num_items: int, num_users: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.user_linear = nn.Linear(dim, 1)
        self.user_bias = nn.Embedding(num_users, 1)
        self.item_bias = nn.Embedding(num_items + 1, 1)
        self.pop_weight = nn.Parameter(torch.zeros(()))
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(dim))
            self.proj.bias.zero_()
            self.user_linear.weight.zero_()
            self.user_linear.bias.zero_()
            self.user_bias.weight.zero_()
            self.item_bias.weight.zero_()

    def bias_parameters(self) -> list[Tensor]:
        """The per-user and per-item offsets (each trained by few impressions)."""
        return [self.user_bias.weight, self.item_bias.weight]

    def logits(
        self, user: Tensor, candidate: Tensor, user_ids: Tensor, item_ids: Tensor, log_pop: Tensor
    ) -> Tensor:
        """(B, D) users, (B, D) candidates, (B,) user indices, (B,) candidate item ids, (B,)
        candidate log popularity shares -> (B,) click logits."""
        dot = (self.proj(user) * candidate).sum(dim=-1)  # (B,)
        u_bias = self.user_linear(user).squeeze(-1) + self.user_bias(user_ids).squeeze(-1)
        return dot + u_bias + self.item_bias(item_ids).squeeze(-1) + self.pop_weight * log_pop

    def forward(
        self, user: Tensor, candidate: Tensor, user_ids: Tensor, item_ids: Tensor, log_pop: Tensor
    ) -> Tensor:
        return torch.sigmoid(self.logits(user, candidate, user_ids, item_ids, log_pop))


def log_popularity(counts: np.ndarray) -> np.ndarray:
    """Log share of each item among the behaviors counted (add-one smoothed), so counts from
    windows of different lengths are on one scale."""
    counts = np.asarray(counts, dtype=np.float64)
    return np.log((counts + 1.0) / (counts.sum() + len(counts)))


class DemoHead(nn.Module):
    """Demographic classifier: a one-hidden-layer MLP over the user vector."""

    def __init__(self, *, dim: int, hidden: int, classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        if classes < 2:
            raise ValueError(f"DemoHead needs at least 2 classes, got {classes}")
        self.dim, self.hidden, self.classes = dim, hidden, classes
        self.drop = nn.Dropout(dropout)
        self.hidden_layer = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden, classes)

    def logits(self, user: Tensor) -> Tensor:
        """(B, D) -> (B, C) unnormalised scores (the training path)."""
        h = self.drop(torch.relu(self.hidden_layer(self.drop(user))))  # (B, hidden)
        return self.out(h)

    def forward(self, user: Tensor) -> Tensor:
        """(B, D) -> (B, C) class probabilities (the serving path)."""
        return torch.softmax(self.logits(user), dim=-1)


def _check_label(label: str) -> None:
    if not _LABEL.fullmatch(label):
        raise ValueError(f"label {label!r} must match {_LABEL.pattern} (it becomes a file name)")


def save_demo_head(directory: Path, label: str, head: DemoHead, classes: list[str]) -> None:
    """Write `demo_<label>.safetensors` + `demo_<label>.json` into `directory`.

    `classes[i]` is the label value that class index i stands for (stored as strings).
    """
    _check_label(label)
    if len(classes) != head.classes:
        raise ValueError(f"{len(classes)} class names for a head with {head.classes} classes")
    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()},
        str(directory / f"demo_{label}.safetensors"),
    )
    spec = {"dim": head.dim, "hidden": head.hidden, "classes": [str(c) for c in classes]}
    (directory / f"demo_{label}.json").write_text(json.dumps(spec, indent=1) + "\n")


def load_demo_heads(directory: Path) -> dict[str, tuple[DemoHead, list[str]]]:
    """Every `demo_<label>` head saved in `directory`: label -> (head in eval mode, classes)."""
    heads: dict[str, tuple[DemoHead, list[str]]] = {}
    for spec_path in sorted(directory.glob("demo_*.json")):
        label = spec_path.stem.removeprefix("demo_")
        spec = json.loads(spec_path.read_text())
        head = DemoHead(dim=spec["dim"], hidden=spec["hidden"], classes=len(spec["classes"]))
        weights = spec_path.with_suffix(".safetensors")
        if not weights.exists():
            raise FileNotFoundError(f"{spec_path}: weights {weights.name} missing")
        head.load_state_dict(load_file(str(weights)))
        heads[label] = (head.eval(), list(spec["classes"]))
    return heads
