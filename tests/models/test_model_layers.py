"""Tests for ptum.models.layers: masking guarantees and the time-gap bucketing."""

import math

import pytest
import torch

from ptum.models.layers import (
    NUM_GAP_BUCKETS,
    AdditiveAttention,
    BiLstm,
    MaskedConv1d,
    MultiHeadSelfAttention,
    reverse_within_length,
    time_gap_bucket,
)


def _prefix_mask(lengths: list[int], L: int) -> torch.Tensor:
    return torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]  # (B, L)


def test_time_gap_bucket_matches_math() -> None:
    gaps = [0, 1, 2, 3, 4, 5, 6, 7, 8, 59, 60, 3599, 3600, 86_399, 86_400, 10**6, 10**9]
    gaps += [2**k + d for k in range(0, 40) for d in (-2, -1, 0, 1) if 2**k + d >= 0]
    gaps += [2**31, 2**31 - 1, 2**40, 2**62]
    got = time_gap_bucket(torch.tensor(gaps)).tolist()
    want = [min(31, math.floor(math.log2(g + 1))) for g in gaps]
    assert got == want


def test_time_gap_bucket_range_and_shape() -> None:
    gaps = torch.tensor([[-5, 0], [2**63 - 2, 7]])
    buckets = time_gap_bucket(gaps)
    assert buckets.shape == (2, 2) and buckets.dtype == torch.long
    assert buckets.tolist() == [[0, 0], [NUM_GAP_BUCKETS - 1, 3]]


def test_additive_attention_ignores_pads_and_zeroes_empty_rows() -> None:
    torch.manual_seed(0)
    pool = AdditiveAttention(dim=8, hidden=5)
    mask = _prefix_mask([4, 2, 0], 4)
    x = torch.randn(3, 4, 8)
    y = pool(x, mask)
    x2 = torch.where(mask[..., None], x, torch.randn_like(x) * 100)
    assert torch.allclose(pool(x2, mask), y)
    assert torch.isfinite(y).all()
    assert torch.equal(y[2], torch.zeros(8))


def test_self_attention_ignores_pads_and_is_finite_on_empty_rows() -> None:
    torch.manual_seed(0)
    attn = MultiHeadSelfAttention(dim=8, heads=2, head_dim=4).eval()
    mask = _prefix_mask([5, 3, 0], 5)
    x = torch.randn(3, 5, 8)
    y = attn(x, mask)
    assert y.shape == (3, 5, 8)
    assert torch.isfinite(y).all()
    assert torch.equal(y * ~mask[..., None], torch.zeros_like(y))
    x2 = torch.where(mask[..., None], x, torch.randn_like(x) * 100)
    assert torch.allclose(attn(x2, mask), y, atol=1e-6)


def test_self_attention_gradients_are_finite_on_empty_rows() -> None:
    attn = MultiHeadSelfAttention(dim=8, heads=2, head_dim=4).train()
    x = torch.randn(2, 3, 8, requires_grad=True)
    attn(x, _prefix_mask([0, 2], 3)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_reverse_within_length_is_an_involution() -> None:
    x = torch.arange(12.0).view(2, 6, 1)
    mask = _prefix_mask([4, 0], 6)
    r = reverse_within_length(x, mask)
    assert r[0, :, 0].tolist() == [3, 2, 1, 0, 4, 5]
    assert r[1, :, 0].tolist() == [6, 7, 8, 9, 10, 11]
    assert torch.equal(reverse_within_length(r, mask), x)


@pytest.mark.parametrize(
    "make",
    [
        lambda: BiLstm(in_dim=8, hidden=4),
        lambda: MaskedConv1d(in_dim=8, out_dim=6),
    ],
)
def test_sequence_layers_ignore_pads(make) -> None:
    torch.manual_seed(0)
    layer = make().eval()
    mask = _prefix_mask([5, 2, 0], 5)
    x = torch.randn(3, 5, 8)
    y = layer(x, mask)
    x2 = torch.where(mask[..., None], x, torch.randn_like(x) * 100)
    assert torch.allclose(layer(x2, mask), y, atol=1e-6)
    assert torch.isfinite(y).all()
    assert torch.equal(y * ~mask[..., None], torch.zeros_like(y))
