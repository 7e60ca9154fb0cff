"""Fine-tuning one demographic (Demo) cell of the grid: a (label, model, mode, ratio, seed) run.

A user's class is predicted from their user vector by a `DemoHead` (optionally plus fixed
"wide" logits); the modes and the epoch loop are `ptum.finetune.loop`'s. Model selection uses
the validation split only; the test split is scored exactly once, with the selected weights, at
the end of the cell.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ptum.data.corpus import Corpus, bucketed_order
from ptum.finetune.loop import BestOnValid, CellRun, fit, init_model, optimizer, split_sizes
from ptum.finetune.metrics import accuracy, macro_f1
from ptum.finetune.options import CellOptions
from ptum.finetune.vectors import all_user_vectors, user_vectors
from ptum.heads import DemoHead
from ptum.models.user_model import UserModel


@dataclass(frozen=True)
class _DemoNet:
    """What scores Demo rows: the model and head, the user vectors computed once (frozen mode
    only) and the fixed wide logits (or None)."""

    model: UserModel
    head: DemoHead
    corpus: Corpus
    device: torch.device
    frozen_vectors: Tensor | None
    wide: Tensor | None

    @staticmethod
    def build(
        model: UserModel,
        head: DemoHead,
        corpus: Corpus,
        frozen: bool,
        wide: np.ndarray | None,
        device: torch.device,
        frozen_vectors: Tensor | None = None,
    ) -> _DemoNet:
        """Frozen: every row's user vector computed once, here (or given: `frozen_vectors`)."""
        vectors = None
        if frozen:
            vectors = frozen_vectors
            if vectors is None:
                vectors = demo_frozen_vectors(model, corpus, device)
        wide_t = torch.from_numpy(wide).to(device) if wide is not None else None
        return _DemoNet(model, head, corpus, device, vectors, wide_t)

    def logits(self, rows: np.ndarray) -> Tensor:
        """(len(rows), C) logits of corpus rows."""
        if self.frozen_vectors is not None:
            u = self.frozen_vectors[rows]
        else:
            u = user_vectors(self.model, self.corpus, rows, self.device)
        out = self.head.logits(u)  # (B, C)
        return out + self.wide[torch.from_numpy(rows)] if self.wide is not None else out

    @torch.no_grad()
    def predict(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows),) predicted class of each row (eval mode)."""
        self.model.eval(), self.head.eval()
        out = [self.logits(rows[i : i + 256]).argmax(-1).cpu() for i in range(0, len(rows), 256)]
        return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


def demo_frozen_vectors(
    pretrained: UserModel, corpus: Corpus, device: torch.device | None = None
) -> Tensor:
    """(rows, D) user vector of every corpus row under the pre-trained model in eval mode: what
    a frozen Demo cell's head reads. They depend on the model and the corpus only (not on the
    split, label, ratio, seed or options), so a grid worker computes them once per model and
    hands them to every frozen cell (run_demo's `frozen_vectors`). `pretrained` is not
    modified (a copy goes to eval mode)."""
    device = device or torch.device("cpu")
    return all_user_vectors(copy.deepcopy(pretrained).to(device), corpus, device)


def _class_weights(
    how: str, y_train: np.ndarray, n_classes: int, device: torch.device
) -> Tensor | None:
    """The cross-entropy's class weights: None ("none") or n / (k * n_c) ("balanced")."""
    if how == "none":
        return None
    if how != "balanced":
        raise ValueError(f"class_weight must be 'none' or 'balanced', got {how!r}")
    counts = np.bincount(y_train, minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, len(y_train) / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32, device=device)


def run_demo(
    *,
    pretrained: UserModel,
    corpus: Corpus,
    y: np.ndarray,
    split: np.ndarray,
    train_rows: np.ndarray,
    n_classes: int,
    mode: str,
    seed: int,
    opts: CellOptions,
    select: str = "acc",
    device: torch.device | None = None,
    wide: np.ndarray | None = None,
    frozen_vectors: Tensor | None = None,
) -> CellRun:
    """Train one demographic cell; its result holds validation-selected test metrics.

    corpus rows align with y / split; y = class index, -1 = label missing (row unused).
    train_rows: the rows of the training subset (ratio) with a label.
    wide: optional (rows, n_classes) logits added to the head's (a fixed "wide" input, e.g.
        baselines.tfidf_lr_logits); the head then learns a correction from the user vector.
    frozen_vectors: frozen mode's (rows, D) user vectors, `demo_frozen_vectors(pretrained,
        corpus)` computed once by the caller (None: computed here; other modes ignore it).
    """
    device = device or torch.device("cpu")
    model = init_model(pretrained, mode, seed).to(device)
    torch.manual_seed(seed + 1)
    head = DemoHead(dim=model.config.dim, hidden=opts.head_hidden, classes=n_classes).to(device)
    frozen = mode == "frozen"
    net = _DemoNet.build(model, head, corpus, frozen, wide, device, frozen_vectors)
    valid_rows = np.flatnonzero((split == "valid") & (y >= 0))
    test_rows = np.flatnonzero((split == "test") & (y >= 0))
    weight = _class_weights(opts.class_weight, y[train_rows], n_classes, device)
    y_t, rng = torch.from_numpy(y).to(device), np.random.default_rng(seed)

    def batches() -> list[np.ndarray]:
        order = train_rows[bucketed_order(corpus.lengths[train_rows], opts.batch_size, rng)]
        return [order[s : s + opts.batch_size] for s in range(0, len(order), opts.batch_size)]

    def loss(batch: np.ndarray) -> Tensor:
        return F.cross_entropy(net.logits(batch), y_t[batch], weight=weight)

    def validate() -> tuple[float, dict[str, float]]:
        scores = _demo_scores(y[valid_rows], net.predict(valid_rows), n_classes)
        return scores[select], scores

    opt, stopper = optimizer(model, head, mode, opts), BestOnValid(opts.patience, model, head)
    if wide is not None:
        # Start from the wide model exactly (the head's output layer at zero) and let early
        # stopping keep it if no epoch of learning from the user vector improves validation.
        torch.nn.init.zeros_(head.out.weight), torch.nn.init.zeros_(head.out.bias)
        stopper.update(*validate())
    epochs = fit(model, head, opt, stopper, batches, loss, validate, opts.max_epochs, frozen)
    # The best epoch's validation scores are those of the restored weights (eval mode is
    # deterministic); None only when no score improved on -inf (no epoch ran, or NaN).
    valid = stopper.kept if stopper.kept is not None else validate()[1]
    result = _demo_result(net, y, n_classes, epochs, valid, train_rows, (valid_rows, test_rows))
    return CellRun(result, model, head)


def _demo_result(
    net: _DemoNet,
    y: np.ndarray,
    n_classes: int,
    epochs: int,
    valid: dict[str, float],
    train_rows: np.ndarray,
    held_out: tuple[np.ndarray, np.ndarray],
) -> dict:
    """A Demo cell's result, its test split scored once, with the selected weights (`valid`:
    their validation scores; held_out: the validation and test rows)."""
    valid_rows, test_rows = held_out
    test_pred = net.predict(test_rows)  # the test split's only use
    return {
        "valid": valid,
        "test": _demo_scores(y[test_rows], test_pred, n_classes),
        "pred": {"row": test_rows.tolist(), "y": y[test_rows].tolist(), "pred": test_pred.tolist()},
        "epochs": epochs,
        **split_sizes(train_rows, valid_rows, test_rows),
    }


def _demo_scores(y: np.ndarray, pred: np.ndarray, n_classes: int) -> dict[str, float]:
    return {"acc": accuracy(y, pred), "macro_f1": macro_f1(y, pred, n_classes)}
