"""Fine-tuning one click-through (CTR) cell of the grid: a (model, mode, ratio, seed) run.

An impression's click is scored from the user vector of the history before its window and the
candidate item's vector (`CtrHead`, or `BiasedCtrHead` with per-user and per-item offsets); the
modes and the epoch loop are `ptum.finetune.loop`'s. Model selection uses the validation
impressions only; the test window is scored exactly once, with the selected weights, at the end
of the cell.
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
from ptum.finetune.metrics import average_precision, roc_auc
from ptum.finetune.options import CellOptions
from ptum.finetune.vectors import all_user_vectors, item_vectors, user_vectors
from ptum.heads import BiasedCtrHead, CtrHead, log_popularity
from ptum.models.user_model import UserModel, encode_ids


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


@dataclass(frozen=True)
class _CtrNet:
    """What scores impressions: the model and head, the item tokens, and in frozen mode the
    user and item vectors computed once ((users, D) per window, (items, D))."""

    model: UserModel
    head: CtrHead | BiasedCtrHead
    data: CtrData
    tokens: Tensor  # (items, L) on device
    device: torch.device
    frozen: tuple[Tensor, Tensor, Tensor] | None  # (train users, test users, items)
    user_index: Tensor  # (impressions,) the biased head's user of each impression
    log_pop: dict[bool, Tensor]  # test window? -> (items,) log popularity before the window

    def logits(self, idx: np.ndarray, test: bool) -> Tensor:
        """(len(idx),) click logits of impressions idx."""
        rows = self.data.row[idx]
        cand_ids = torch.from_numpy(self.data.item[idx]).to(self.device)
        if self.frozen is not None:
            u = self.frozen[1 if test else 0][torch.from_numpy(rows)]
            c = self.frozen[2][cand_ids]
        else:
            uniq, inv = np.unique(rows, return_inverse=True)
            hist = self.data.hist_test if test else self.data.hist_train
            u = user_vectors(self.model, hist, uniq, self.device)[torch.from_numpy(inv)]
            (c,) = encode_ids(self.model, self.tokens, [cand_ids])
        if isinstance(self.head, BiasedCtrHead):
            users = self.user_index[torch.from_numpy(idx).to(self.device)]
            return self.head.logits(u, c, users, cand_ids, self.log_pop[test][cand_ids])
        return self.head.logits(u, c)

    @torch.no_grad()
    def predict(self, idx: np.ndarray, test: bool) -> tuple[np.ndarray, np.ndarray]:
        """(impressions regrouped by user, their logits), in eval mode."""
        self.model.eval(), self.head.eval()
        # Group by user so each history is encoded once per chunk.
        idx = idx[np.argsort(self.data.row[idx], kind="stable")]
        out = [self.logits(idx[i : i + 2048], test).float().cpu() for i in range(0, len(idx), 2048)]
        return idx, (torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32))


def ctr_frozen_vectors(
    pretrained: UserModel, data: CtrData, device: torch.device | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """((train-window users, D), (test-window users, D), (items, D)): the user vectors of both
    history corpora and every item's vector under the pre-trained model in eval mode, what a
    frozen CTR cell's head reads. They depend on the model, the histories and the item tokens
    only (not on the split, ratio, seed or options), so a grid worker computes them once per
    model and hands them to every frozen cell (run_ctr's `frozen_vectors`). `pretrained` is
    not modified (a copy goes to eval mode)."""
    device = device or torch.device("cpu")
    model = copy.deepcopy(pretrained).to(device)
    tokens = data.hist_train.tokens.to(device)
    return (
        all_user_vectors(model, data.hist_train, device),
        all_user_vectors(model, data.hist_test, device),
        item_vectors(model, tokens, np.arange(tokens.shape[0])),
    )


def _ctr_net(
    model: UserModel,
    data: CtrData,
    mode: str,
    opts: CellOptions,
    device: torch.device,
    frozen_vectors: tuple[Tensor, Tensor, Tensor] | None = None,
) -> _CtrNet:
    """The CTR head of `opts.ctr_scoring` on `model`, with what scoring needs (frozen mode:
    `frozen_vectors`, or computed here when None)."""
    tokens = data.hist_train.tokens.to(device)
    users = data.user if data.user is not None else data.row
    head: CtrHead | BiasedCtrHead
    if opts.ctr_scoring == "bias":
        head = BiasedCtrHead(
            dim=model.config.dim, num_items=tokens.shape[0] - 1, num_users=int(users.max()) + 1
        ).to(device)
    elif opts.ctr_scoring == "dot":
        head = CtrHead(dim=model.config.dim).to(device)
    else:
        raise ValueError(f"ctr_scoring must be 'dot' or 'bias', got {opts.ctr_scoring!r}")
    log_pop = {
        test: torch.from_numpy(
            log_popularity(pop if pop is not None else np.zeros(tokens.shape[0])).astype(np.float32)
        ).to(device)
        for test, pop in ((False, data.popularity_train), (True, data.popularity_test))
    }
    frozen = None
    if mode == "frozen":
        frozen = (
            frozen_vectors
            if frozen_vectors is not None
            else ctr_frozen_vectors(model, data, device)
        )
    user_index = torch.from_numpy(users.astype(np.int64)).to(device)
    return _CtrNet(model, head, data, tokens, device, frozen, user_index, log_pop)


def _user_groups(data: CtrData, train_idx: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """(training impressions of each user, each user's history length). A batch is a set of
    users with all their impressions (MIND-style), so each history is encoded once per step
    however many candidates it has."""
    sorted_idx = train_idx[np.argsort(data.row[train_idx], kind="stable")]
    users, starts = np.unique(data.row[sorted_idx], return_index=True)
    groups = np.split(sorted_idx, starts[1:]) if len(users) else []
    return groups, data.hist_train.lengths[users]


def run_ctr(
    *,
    pretrained: UserModel,
    data: CtrData,
    train_idx: np.ndarray,
    mode: str,
    seed: int,
    opts: CellOptions,
    device: torch.device | None = None,
    frozen_vectors: tuple[Tensor, Tensor, Tensor] | None = None,
) -> CellRun:
    """Train one CTR cell (train_idx: impressions of the training subset); its result holds the
    validation-selected test AUC and AP. frozen_vectors: frozen mode's vectors,
    `ctr_frozen_vectors(pretrained, data)` computed once by the caller (None: computed here;
    other modes ignore it)."""
    device = device or torch.device("cpu")
    model = init_model(pretrained, mode, seed).to(device)
    torch.manual_seed(seed + 1)
    net = _ctr_net(model, data, mode, opts, device, frozen_vectors)
    y = torch.from_numpy(data.clicked.astype(np.float32)).to(device)
    valid_idx = np.flatnonzero(data.window == "valid")
    test_idx = np.flatnonzero(data.window == "test")
    groups, lengths = _user_groups(data, train_idx)
    rng, per_batch = np.random.default_rng(seed), opts.ctr_users_per_batch

    def score(idx: np.ndarray) -> dict[str, float]:
        idx, s = net.predict(idx, False)
        return {"auc": roc_auc(data.clicked[idx], s), "ap": average_precision(data.clicked[idx], s)}

    def loss(batch: np.ndarray) -> Tensor:
        return F.binary_cross_entropy_with_logits(
            net.logits(batch, False), y[torch.from_numpy(batch)]
        )

    def validate() -> tuple[float, dict[str, float]]:
        scores = score(valid_idx)
        return scores["auc"], scores

    def batches() -> list[np.ndarray]:
        order = bucketed_order(lengths, per_batch, rng)
        return [
            np.concatenate([groups[g] for g in order[s : s + per_batch]])
            for s in range(0, len(order), per_batch)
        ]

    head, opt, frozen = net.head, optimizer(model, net.head, mode, opts), mode == "frozen"
    stopper = BestOnValid(opts.patience, model, head)
    epochs = fit(model, head, opt, stopper, batches, loss, validate, opts.max_epochs, frozen)
    # The best epoch's validation scores are those of the restored weights (eval mode is
    # deterministic); None only when no epoch improved on -inf (none ran, or every AUC is NaN).
    valid = stopper.kept if stopper.kept is not None else score(valid_idx)
    result = _ctr_result(net, valid, epochs, train_idx, valid_idx, test_idx)
    return CellRun(result, model, head)


def _ctr_result(
    net: _CtrNet,
    valid: dict[str, float],
    epochs: int,
    train_idx: np.ndarray,
    valid_idx: np.ndarray,
    test_idx: np.ndarray,
) -> dict:
    """A CTR cell's result, its test split scored once, with the selected weights."""
    rows, s = net.predict(test_idx, True)  # the test split's only use
    s, yt = np.round(s.astype(np.float64), 6), net.data.clicked[rows]  # as saved: recomputable
    return {
        "valid": valid,
        "test": {"auc": roc_auc(yt, s), "ap": average_precision(yt, s)},
        "pred": {"row": rows.tolist(), "y": yt.tolist(), "score": s.tolist()},
        "epochs": epochs,
        **split_sizes(train_idx, valid_idx, test_idx),
    }
