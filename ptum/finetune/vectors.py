"""User and item vectors of a user model over a task's corpus (what every head reads)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ptum.data.corpus import Corpus, recency_positions
from ptum.models.layers import time_gap_bucket
from ptum.models.user_model import UserModel, encode_ids


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
    """(users, D) vectors of every corpus row (eval mode)."""
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
