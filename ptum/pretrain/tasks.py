"""MBP and NBP forward passes and losses (paper Eq. 1-3).

The behaviors of a batch repeat a lot (popular items, candidates that are also history items),
so by default each distinct item of the batch is encoded once and the vectors are gathered
(`unique=True`). `unique=False` is the naive per-behavior encoding, kept for the benchmark and
for the equivalence test.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ptum.models.user_model import UserModel, encode_ids
from ptum.pretrain.data import Batch


def masked_ce(logits: Tensor, valid: Tensor, weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Cross-entropy with the positive at index 0 over valid candidates; returns (loss, acc).

    logits/valid: (..., C). weight: optional (...) bool of samples that count.
    """
    logits = logits.float().masked_fill(~valid, float("-inf"))
    flat = logits.reshape(-1, logits.shape[-1])
    target = torch.zeros(flat.shape[0], dtype=torch.long, device=flat.device)
    loss = F.cross_entropy(flat, target, reduction="none")
    correct = (flat.argmax(-1) == 0).float()
    if weight is None:
        return loss.mean(), correct.mean()
    w = weight.reshape(-1).float()
    denom = w.sum().clamp_min(1.0)
    return (loss * w).sum() / denom, (correct * w).sum() / denom


def ptum_step(
    model: UserModel,
    tokens: Tensor,
    batch: Batch,
    *,
    use_mbp: bool,
    use_nbp: bool,
    lam: float,
    unique: bool = True,
) -> dict[str, Tensor]:
    """One forward pass of the self-supervised tasks; returns named scalars.

    loss = L_MBP + lam * L_NBP (Eq. 3); a switched-off task contributes nothing and is not
    computed. Scores are dot products between the user vector and each candidate vector.
    """
    ids = [batch.items, batch.mbp_cands, batch.past_items, batch.nbp_cands]
    seq_vecs, mbp_vecs, past_vecs, nbp_vecs = encode_ids(model, tokens, ids, unique)
    out: dict[str, Tensor] = {}
    total = seq_vecs.new_zeros(())
    if use_mbp:
        user = model.encode_users(
            seq_vecs, batch.mask, batch.positions, batch.gap_buckets, batch.mbp_mask
        )  # (B, D)
        logits = torch.einsum("bd,bcd->bc", user, mbp_vecs)  # (B, 1 + P)
        out["mbp_loss"], out["mbp_acc"] = masked_ce(logits, batch.mbp_valid)
        total = total + out["mbp_loss"]
    if use_nbp:
        user = model.encode_users(
            past_vecs, batch.past_mask, batch.past_positions, batch.gap_buckets
        )  # (B, D)
        logits = torch.einsum("bd,bkcd->bkc", user, nbp_vecs)  # (B, K, 1 + P)
        # Eq. 2: average over the K next behaviors (those that exist for short users).
        out["nbp_loss"], out["nbp_acc"] = masked_ce(logits, batch.nbp_valid, batch.nbp_target_valid)
        total = total + lam * out["nbp_loss"]
    out["loss"] = total
    return out
