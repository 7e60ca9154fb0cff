"""Tests for ptum.models.behavior: shapes, pad invariance, empty items, batch consistency."""

import pytest
import torch
from torch import nn

from ptum.models.behavior import (
    BEHAVIOR_ENCODERS,
    CnnBehaviorEncoder,
    IdBehaviorEncoder,
    LstmBehaviorEncoder,
    SelfAttnBehaviorEncoder,
)

VOCAB, T, OUT = 50, 6, 32
TINY = dict(vocab_size=VOCAB, word_dim=16, attn_hidden=8, out_dim=OUT, dropout=0.1)
TEXT_ENCODERS = {
    "selfattn": lambda: SelfAttnBehaviorEncoder(**TINY, max_tokens=T, heads=2, head_dim=8),
    "cnn": lambda: CnnBehaviorEncoder(**TINY, filters=24),
    "lstm": lambda: LstmBehaviorEncoder(**TINY, hidden=12),
}


def _items(lengths: list[int], width: int = T) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded random token rows: (N, width) long, (N, width) bool."""
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    tokens = torch.randint(1, VOCAB, (len(lengths), width)) * mask
    return tokens, mask


def test_dict_lists_every_encoder() -> None:
    assert set(BEHAVIOR_ENCODERS) == {"selfattn", "cnn", "lstm", "id", "hybrid"}


@pytest.fixture(params=sorted(TEXT_ENCODERS))
def encoder(request) -> nn.Module:
    torch.manual_seed(0)
    return TEXT_ENCODERS[request.param]().eval()


def test_output_shape(encoder: nn.Module) -> None:
    tokens, mask = _items([6, 3, 1, 0])
    assert encoder(tokens, mask).shape == (4, OUT)


def test_padded_token_ids_do_not_matter(encoder: nn.Module) -> None:
    tokens, mask = _items([6, 3, 1, 0])
    other = torch.where(mask, tokens, torch.randint(1, VOCAB, tokens.shape))
    assert not torch.equal(other, tokens)
    assert torch.allclose(encoder(other, mask), encoder(tokens, mask), atol=1e-6)


def test_all_pad_item_is_finite(encoder: nn.Module) -> None:
    tokens, mask = _items([0, 0])
    assert torch.isfinite(encoder(tokens, mask)).all()
    encoder.train()
    assert torch.isfinite(encoder(tokens, mask)).all()


def test_batch_consistency(encoder: nn.Module) -> None:
    tokens, mask = _items([3, 6])
    alone = encoder(tokens[:1, :3], mask[:1, :3])
    assert torch.allclose(encoder(tokens, mask)[:1], alone, atol=1e-5)


def test_id_encoder_looks_up_item_ids() -> None:
    enc = IdBehaviorEncoder(num_items=10, out_dim=OUT)
    ids = torch.tensor([[3], [0], [3]])
    out = enc(ids, ids != 0)
    assert out.shape == (3, OUT)
    assert torch.equal(out[0], out[2]) and torch.equal(out[1], torch.zeros(OUT))
