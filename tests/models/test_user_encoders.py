"""Tests for ptum.models.user: shapes, pad invariance, empty users, batch consistency."""

import pytest
import torch
from torch import nn

from ptum.models.user import (
    USER_ENCODERS,
    Bert4RecUserEncoder,
    Gru4RecUserEncoder,
    HanUserEncoder,
    HsaUserEncoder,
    HuraUserEncoder,
    NativeCtrUserEncoder,
)

D, MAX_LEN = 32, 10
TINY = dict(dim=D, max_len=MAX_LEN, dropout=0.1)
ENCODERS = {
    "hsa": lambda: HsaUserEncoder(**TINY, heads=2, head_dim=8, attn_hidden=8),
    "han": lambda: HanUserEncoder(**TINY, hidden=12, attn_hidden=8),
    "hura": lambda: HuraUserEncoder(**TINY, filters=24, attn_hidden=8),
    "gru4rec": lambda: Gru4RecUserEncoder(**TINY, hidden=24),
    "nativectr": lambda: NativeCtrUserEncoder(**TINY, attn_hidden=8),
    "bert4rec": lambda: Bert4RecUserEncoder(**TINY, heads=2, head_dim=8, layers=2, attn_hidden=8),
}


def _users(lengths: list[int], L: int) -> tuple[torch.Tensor, ...]:
    """Right-padded users as the data pipeline builds them: vecs, mask, positions, gap_buckets."""
    n = torch.tensor(lengths)[:, None]  # (B, 1)
    i = torch.arange(L)[None, :]  # (1, L)
    mask = i < n
    vecs = torch.randn(len(lengths), L, D)
    positions = torch.where(mask, n - 1 - i, 0)  # recency rank, 0 = most recent
    gaps = torch.randint(0, 32, (len(lengths), L)) * mask
    return vecs, mask, positions, gaps


def test_dict_lists_every_encoder() -> None:
    assert set(USER_ENCODERS) == set(ENCODERS)


@pytest.fixture(params=sorted(ENCODERS))
def encoder(request) -> nn.Module:
    torch.manual_seed(0)
    return ENCODERS[request.param]().eval()


def test_output_shape(encoder: nn.Module) -> None:
    assert encoder(*_users([5, 2, 0], 5)).shape == (3, D)


def test_masked_behaviors_do_not_matter(encoder: nn.Module) -> None:
    vecs, mask, positions, gaps = _users([6, 2, 1], 6)
    pads = ~mask
    junk_vecs = torch.where(pads[..., None], torch.randn_like(vecs) * 10, vecs)
    junk_pos = torch.where(pads, torch.randint(0, MAX_LEN, positions.shape), positions)
    junk_gaps = torch.where(pads, torch.randint(0, 32, gaps.shape), gaps)
    got = encoder(junk_vecs, mask, junk_pos, junk_gaps)
    assert torch.allclose(got, encoder(vecs, mask, positions, gaps), atol=1e-5)


def test_real_behaviors_do_matter(encoder: nn.Module) -> None:
    vecs, mask, positions, gaps = _users([3], 3)
    changed = vecs.clone()
    # A random direction, not a constant shift: a LayerNorm (BERT4Rec's residual stream) removes
    # a shift added to every component exactly, and the test would hinge on float rounding.
    changed[0, 2] += torch.randn(D, generator=torch.Generator().manual_seed(0))
    diff = (encoder(changed, mask, positions, gaps) - encoder(vecs, mask, positions, gaps)).abs()
    assert diff.max() > 1e-3


def test_empty_user_is_finite(encoder: nn.Module) -> None:
    batch = _users([0, 0], 4)
    assert torch.isfinite(encoder(*batch)).all()
    encoder.train()
    out = encoder(*batch)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in encoder.parameters() if p.grad is not None)


def test_batch_consistency(encoder: nn.Module) -> None:
    vecs, mask, positions, gaps = _users([3, 7], 8)
    vecs[0, 3:] = torch.randn(5, D)  # junk in the pads
    alone = encoder(vecs[:1, :3], mask[:1, :3], positions[:1, :3], gaps[:1, :3])
    assert torch.allclose(encoder(vecs, mask, positions, gaps)[:1], alone, atol=1e-5)
