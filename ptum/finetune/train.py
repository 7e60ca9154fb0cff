"""Fine-tuning one cell of the grid: a (task, model, mode, ratio, seed) run, explicit loops.

Modes (paper Tables 2-3):
    scratch   the architecture of the pre-trained checkpoint, randomly initialised, trained end
              to end on the task;
    frozen    "+PTUM (no finetune)": the pre-trained user model is fixed; user (and candidate)
              vectors are computed once and only the head trains;
    finetune  "+PTUM (finetune)": pre-trained weights, everything trains.

Model selection uses the validation split only (early stopping with patience); the test split is
scored exactly once, with the selected weights, at the end of the cell.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ptum.data.corpus import Corpus, bucketed_order, recency_positions
from ptum.finetune.metrics import accuracy, average_precision, macro_f1, roc_auc
from ptum.heads import BiasedCtrHead, CtrHead, DemoHead, log_popularity
from ptum.models.layers import time_gap_bucket
from ptum.models.user_model import UserModel, encode_ids

MODES = ("scratch", "frozen", "finetune")


@dataclass(frozen=True)
class CellOptions:
    lr: float = 1e-3
    batch_size: int = 64
    max_epochs: int = 10
    patience: int = 2
    head_hidden: int = 200
    weight_decay: float = 0.0
    # CTR batches hold whole users: all their training impressions share one history encoding.
    ctr_users_per_batch: int = 16
    # finetune mode: the pre-trained encoder learns at lr * this (the head at lr), so a few
    # thousand labels refine the pre-trained weights instead of overwriting them. 1.0 = one lr.
    encoder_lr_scale: float = 1.0
    # Demo loss: "none" (plain cross-entropy) or "balanced" (class weights n / (k * n_c) of the
    # training subset, so a minority class is not ignored on small, imbalanced label sets).
    class_weight: str = "none"
    # CTR scoring: "dot" (the paper's user . candidate, with a learned map) or "bias" (plus a
    # user bias and a per-item candidate bias with a popularity fallback; ptum.heads).
    ctr_scoring: str = "dot"
    # "bias" head: its per-user / per-item offsets learn at lr * this (see _optimizer).
    bias_lr_scale: float = 1.0
    # Demo: add the out-of-fold TF-IDF logistic-regression log-probabilities of the user's bag of
    # items to the head's logits (a wide input, the same in every mode; see run_demo's `wide`).
    demo_wide: bool = False


def user_vectors(
    model: UserModel, corpus: Corpus, rows: np.ndarray, device: torch.device
) -> Tensor:
    """(len(rows), D) user vectors of corpus rows (grad flows if the model is training)."""
    lengths = corpus.lengths[rows]
    # Only up to the longest sequence of these rows: the rest is padding, masked anyway.
    width = max(int(lengths.max()) if len(rows) else 1, 1)
    items = torch.from_numpy(corpus.items[rows, :width]).to(device)
    mask = torch.from_numpy(np.arange(items.shape[1])[None, :] < lengths[:, None]).to(device)
    positions = torch.from_numpy(recency_positions(lengths, items.shape[1])).to(device)
    gaps = time_gap_bucket(torch.from_numpy(corpus.gaps[rows, :width])).to(device)
    (vecs,) = encode_ids(model, corpus.tokens, [items])
    return model.encode_users(vecs, mask, positions, gaps)


@torch.no_grad()
def all_user_vectors(
    model: UserModel, corpus: Corpus, device: torch.device, batch: int = 256
) -> Tensor:
    model.eval()
    rows = np.arange(len(corpus.user_ids))
    return (
        torch.cat(
            [
                user_vectors(model, corpus, rows[i : i + batch], device)
                for i in range(0, len(rows), batch)
            ]
        )
        if len(rows)
        else torch.zeros(0)
    )


@torch.no_grad()
def item_vectors(model: UserModel, tokens: Tensor, ids: np.ndarray, batch: int = 1024) -> Tensor:
    """(len(ids), D) behavior vectors of item ids (eval mode)."""
    model.eval()
    out = []
    for i in range(0, len(ids), batch):
        (vecs,) = encode_ids(model, tokens, [torch.from_numpy(ids[i : i + batch])])
        out.append(vecs)
    return torch.cat(out)


class _BestOnValid:
    """Early stopping: keeps the weights of the best validation score, counts bad epochs."""

    def __init__(self, patience: int, *modules: torch.nn.Module):
        self.patience, self.modules = patience, modules
        self.best, self.bad = -np.inf, 0
        self.state = _state(*modules)

    def update(self, score: float) -> bool:
        """Record an epoch's validation score; True when training should stop."""
        if score > self.best:
            self.best, self.bad, self.state = score, 0, _state(*self.modules)
            return False
        self.bad += 1
        return self.bad >= self.patience

    def restore(self) -> None:
        for m, st in zip(self.modules, self.state):
            m.load_state_dict(st)


def _init_model(pretrained: UserModel, mode: str, seed: int) -> UserModel:
    torch.manual_seed(seed)
    if mode == "scratch":
        return UserModel(config=pretrained.config)
    return copy.deepcopy(pretrained)


def _optimizer(
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


# ---------------------------------------------------------------- demographic tasks


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
    return_models: bool = False,
    wide: np.ndarray | None = None,
) -> dict:
    """Train one demographic cell; returns validation-selected test metrics.

    corpus rows align with y / split; y = class index, -1 = label missing (row unused).
    train_rows: the rows of the training subset (ratio) with a label.
    wide: optional (rows, n_classes) logits added to the head's (a fixed "wide" input, e.g.
        baselines.tfidf_lr_logits); the head then learns a correction from the user vector.

    Long because it is one explicit training loop, read top to bottom: set-up, the closures
    that score rows (they share the model, the head and the cached vectors), epochs with early
    stopping on validation, then the test split's single use.
    """
    device = device or torch.device("cpu")
    model = _init_model(pretrained, mode, seed).to(device)
    torch.manual_seed(seed + 1)
    head = DemoHead(dim=model.config.dim, hidden=opts.head_hidden, classes=n_classes).to(device)
    valid_rows = np.flatnonzero((split == "valid") & (y >= 0))
    test_rows = np.flatnonzero((split == "test") & (y >= 0))
    frozen = mode == "frozen"
    cached = all_user_vectors(model, corpus, device) if frozen else None
    opt = _optimizer(model, head, mode, opts)
    y_t = torch.from_numpy(y).to(device)
    wide_t = torch.from_numpy(wide).to(device) if wide is not None else None
    weight = None
    if opts.class_weight == "balanced":
        counts = np.bincount(y[train_rows], minlength=n_classes).astype(np.float64)
        w = np.where(counts > 0, len(train_rows) / (n_classes * np.maximum(counts, 1)), 0.0)
        weight = torch.tensor(w, dtype=torch.float32, device=device)
    elif opts.class_weight != "none":
        raise ValueError(f"class_weight must be 'none' or 'balanced', got {opts.class_weight!r}")

    def vectors(rows: np.ndarray) -> Tensor:
        return cast(Tensor, cached)[rows] if frozen else user_vectors(model, corpus, rows, device)

    def logits(rows: np.ndarray) -> Tensor:
        out = head.logits(vectors(rows))  # (B, C)
        return out + wide_t[torch.from_numpy(rows)] if wide_t is not None else out

    @torch.no_grad()
    def predict(rows: np.ndarray) -> np.ndarray:
        model.eval(), head.eval()
        out = [logits(rows[i : i + 256]).argmax(-1).cpu() for i in range(0, len(rows), 256)]
        return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)

    def score(rows: np.ndarray) -> dict[str, float]:
        pred = predict(rows)
        return {"acc": accuracy(y[rows], pred), "macro_f1": macro_f1(y[rows], pred, n_classes)}

    rng = np.random.default_rng(seed)
    stopper, epochs = _BestOnValid(opts.patience, model, head), 0
    if wide_t is not None:
        # Start from the wide model exactly (the head's output layer at zero) and let early
        # stopping keep it if no epoch of learning from the user vector improves validation.
        torch.nn.init.zeros_(head.out.weight), torch.nn.init.zeros_(head.out.bias)
        stopper.update(score(valid_rows)[select])
    for epoch in range(opts.max_epochs):
        model.train(not frozen), head.train()
        order = train_rows[bucketed_order(corpus.lengths[train_rows], opts.batch_size, rng)]
        for start in range(0, len(order), opts.batch_size):
            batch = order[start : start + opts.batch_size]
            loss = F.cross_entropy(logits(batch), y_t[batch], weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        epochs = epoch + 1
        if stopper.update(score(valid_rows)[select]):
            break
    stopper.restore()
    valid = score(valid_rows)
    test_pred = predict(test_rows)  # the test split's only use
    test = {
        "acc": accuracy(y[test_rows], test_pred),
        "macro_f1": macro_f1(y[test_rows], test_pred, n_classes),
    }
    out = {
        "valid": valid,
        "test": test,
        "pred": {"row": test_rows.tolist(), "y": y[test_rows].tolist(), "pred": test_pred.tolist()},
        "epochs": epochs,
        "n_train": len(train_rows),
        "n_valid": len(valid_rows),
        "n_test": len(test_rows),
    }
    return out | ({"model": model, "head": head} if return_models else {})


# ---------------------------------------------------------------- CTR


@dataclass(frozen=True)
class CtrData:
    """Impressions of the CTR task; `row` indexes the history corpus of the impression's window
    (before_train for train/valid impressions, before_test for test impressions)."""

    hist_train: Corpus
    hist_test: Corpus
    row: np.ndarray
    item: np.ndarray
    clicked: np.ndarray
    window: np.ndarray
    # Behaviors per item id before the CTR-train / CTR-test window (all users): label-free
    # popularity from the past of each window. None: unknown (the "bias" head then has none).
    popularity_train: np.ndarray | None = None
    popularity_test: np.ndarray | None = None
    # One index per user across windows (the "bias" head's per-user offset); None: by row.
    user: np.ndarray | None = None


def run_ctr(
    *,
    pretrained: UserModel,
    data: CtrData,
    train_idx: np.ndarray,
    mode: str,
    seed: int,
    opts: CellOptions,
    device: torch.device | None = None,
    return_models: bool = False,
) -> dict:
    """Train one CTR cell (train_idx: impressions of the training subset).

    Long for the reason run_demo is: one explicit training loop whose closures (logits,
    predict, score) share the model, the head and the frozen vectors.
    """
    device = device or torch.device("cpu")
    model = _init_model(pretrained, mode, seed).to(device)
    torch.manual_seed(seed + 1)
    tokens = data.hist_train.tokens.to(device)
    if opts.ctr_scoring == "bias":
        user_index: np.ndarray | Tensor = data.user if data.user is not None else data.row
        head: CtrHead | BiasedCtrHead = BiasedCtrHead(
            dim=model.config.dim, num_items=tokens.shape[0] - 1, num_users=int(user_index.max()) + 1
        ).to(device)
        user_index = torch.from_numpy(cast(np.ndarray, user_index).astype(np.int64)).to(device)
    elif opts.ctr_scoring == "dot":
        head = CtrHead(dim=model.config.dim).to(device)
    else:
        raise ValueError(f"ctr_scoring must be 'dot' or 'bias', got {opts.ctr_scoring!r}")
    n = tokens.shape[0]
    log_pop = {
        test: torch.from_numpy(
            log_popularity(pop if pop is not None else np.zeros(n)).astype(np.float32)
        ).to(device)
        for test, pop in ((False, data.popularity_train), (True, data.popularity_test))
    }
    frozen = mode == "frozen"
    if frozen:
        u_train = all_user_vectors(model, data.hist_train, device)
        u_test = all_user_vectors(model, data.hist_test, device)
        items = item_vectors(model, tokens, np.arange(tokens.shape[0]))
    opt = _optimizer(model, head, mode, opts)
    y = torch.from_numpy(data.clicked.astype(np.float32)).to(device)

    def logits(idx: np.ndarray, test: bool) -> Tensor:
        rows = data.row[idx]
        cand_ids = torch.from_numpy(data.item[idx]).to(device)
        if frozen:
            u = (u_test if test else u_train)[torch.from_numpy(rows)]
            c = items[cand_ids]
        else:
            uniq, inv = np.unique(rows, return_inverse=True)
            u = user_vectors(model, data.hist_test if test else data.hist_train, uniq, device)
            u = u[torch.from_numpy(inv)]
            (c,) = encode_ids(model, tokens, [cand_ids])
        if isinstance(head, BiasedCtrHead):
            user_ids = user_index[torch.from_numpy(idx).to(device)]
            return head.logits(u, c, user_ids, cand_ids, log_pop[test][cand_ids])
        return head.logits(u, c)

    @torch.no_grad()
    def predict(idx: np.ndarray, test: bool) -> tuple[np.ndarray, np.ndarray]:
        """(impressions regrouped by user, their logits)."""
        model.eval(), head.eval()
        # Group by user so each history is encoded once per chunk.
        idx = idx[np.argsort(data.row[idx], kind="stable")]
        out = [logits(idx[i : i + 2048], test).float().cpu() for i in range(0, len(idx), 2048)]
        return idx, (torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32))

    def score(idx: np.ndarray, test: bool) -> dict[str, float]:
        idx, s = predict(idx, test)
        yt = data.clicked[idx]
        return {"auc": roc_auc(yt, s), "ap": average_precision(yt, s)}

    valid_idx = np.flatnonzero(data.window == "valid")
    test_idx = np.flatnonzero(data.window == "test")
    # Group the training impressions by user (MIND-style): a batch is a set of users with all
    # their impressions, so each history is encoded once per step however many candidates.
    by_user = np.argsort(data.row[train_idx], kind="stable")
    sorted_idx = train_idx[by_user]
    users, starts = np.unique(data.row[sorted_idx], return_index=True)
    groups = np.split(sorted_idx, starts[1:]) if len(users) else []
    group_lengths = data.hist_train.lengths[users]
    rng = np.random.default_rng(seed)
    stopper, epochs = _BestOnValid(opts.patience, model, head), 0
    for epoch in range(opts.max_epochs):
        model.train(not frozen), head.train()
        order = bucketed_order(group_lengths, opts.ctr_users_per_batch, rng)
        for start in range(0, len(order), opts.ctr_users_per_batch):
            batch = np.concatenate(
                [groups[g] for g in order[start : start + opts.ctr_users_per_batch]]
            )
            loss = F.binary_cross_entropy_with_logits(
                logits(batch, False), y[torch.from_numpy(batch)]
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        epochs = epoch + 1
        if stopper.update(score(valid_idx, False)["auc"]):
            break
    stopper.restore()
    valid = score(valid_idx, False)
    rows, s = predict(test_idx, True)  # the test split's only use
    s, yt = np.round(s.astype(np.float64), 6), data.clicked[rows]  # as saved, so recomputable
    out = {
        "valid": valid,
        "test": {"auc": roc_auc(yt, s), "ap": average_precision(yt, s)},
        "pred": {"row": rows.tolist(), "y": yt.tolist(), "score": s.tolist()},
        "epochs": epochs,
        "n_train": len(train_idx),
        "n_valid": len(valid_idx),
        "n_test": len(test_idx),
    }
    return out | ({"model": model, "head": head} if return_models else {})
