"""The hybrid behavior encoder: text + item-id vectors, the UNKNOWN fallback, masking, config."""

import pytest
import torch

from ptum.models.behavior import PAD_ROW, UNKNOWN_ROW, HybridBehaviorEncoder
from ptum.models.user_model import ARCHITECTURES, ModelConfig, UserModel

VOCAB, T, L, D, ITEMS = 40, 5, 6, 16, 12
TINY = dict(
    vocab_size=VOCAB,
    max_tokens=T,
    max_behaviors=L,
    word_dim=16,
    dim=D,
    heads=2,
    head_dim=8,
    attn_hidden=8,
    dropout=0.0,
    layers=1,
    num_items=ITEMS + 1,
)
# Items 1-4 have their own rows 2-5; 5..ITEMS are unknown (rare or never seen).
KNOWN = {1: 2, 2: 3, 3: 4, 4: 5}


def _model(arch: str = "hsa") -> UserModel:
    torch.manual_seed(0)
    cfg = ModelConfig.for_architecture(arch, behavior_encoder="hybrid", id_vocab=6, **TINY)
    model = UserModel(config=cfg).eval()
    index = torch.full((ITEMS + 1,), UNKNOWN_ROW)
    index[0] = PAD_ROW
    for item, row in KNOWN.items():
        index[item] = row
    model.behavior_encoder.set_id_index(index)
    return model


def _rows(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCAB, (n, T), generator=g)
    tokens[:, 3:] = 0  # right-padded texts of 3 tokens
    return tokens, tokens != 0


def test_hybrid_wraps_the_architectures_own_text_encoder() -> None:
    for arch, (own, _) in ARCHITECTURES.items():
        cfg = ModelConfig.for_architecture(arch, behavior_encoder="hybrid", id_vocab=3, **TINY)
        assert cfg.hybrid_text == own
        assert type(UserModel(config=cfg).behavior_encoder.text).__name__.lower().startswith(own)
    with pytest.raises(ValueError, match="hybrid_text"):
        ModelConfig(behavior_encoder="hybrid", user_encoder="hsa", id_vocab=3, **TINY)
    with pytest.raises(ValueError, match="id_vocab >= 2"):
        ModelConfig.for_architecture("hsa", behavior_encoder="hybrid", **TINY)
    with pytest.raises(ValueError, match="for behavior_encoder 'hybrid' only"):
        ModelConfig.for_architecture("hsa", hybrid_text="cnn", **TINY)


def test_rare_and_unseen_items_share_the_unknown_vector_but_keep_their_text() -> None:
    model = _model()
    enc = model.behavior_encoder
    tokens, mask = _rows(3)
    # Items 7 and 11 are both unknown: with the same text they get exactly the same vector.
    same_text = model.encode_items(tokens[[0, 0]], mask[[0, 0]], torch.tensor([7, 11]))
    assert torch.equal(same_text[0], same_text[1])
    assert torch.equal(enc.ids(enc.id_index[torch.tensor([7, 11])]).diff(dim=0), torch.zeros(1, D))
    # With their own texts they differ: the text part still tells new items apart.
    own_text = model.encode_items(tokens[[0, 1]], mask[[0, 1]], torch.tensor([7, 11]))
    assert not torch.allclose(own_text[0], own_text[1], atol=1e-4)
    # A known item's id changes the vector for the same text: the id part is used.
    known = model.encode_items(tokens[[0, 0]], mask[[0, 0]], torch.tensor([1, 7]))
    assert not torch.allclose(known[0], known[1], atol=1e-4)


def test_the_unknown_vector_is_learned_and_padding_stays_zero() -> None:
    model = _model().train()
    tokens, mask = _rows(3)
    out = model.encode_items(tokens, mask, torch.tensor([0, 7, 1]))
    out.sum().backward()
    grad = model.behavior_encoder.ids.weight.grad
    assert grad[UNKNOWN_ROW].abs().sum() > 0 and grad[KNOWN[1]].abs().sum() > 0
    assert torch.equal(grad[PAD_ROW], torch.zeros(D))
    assert torch.equal(model.behavior_encoder.ids.weight[PAD_ROW], torch.zeros(D))


def _users(seed: int) -> dict[str, torch.Tensor]:
    """Two users of 4 and 2 behaviors, right-padded to L behaviors of T tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([4, 2])[:, None]
    i = torch.arange(L)[None, :]
    mask = i < lengths  # (2, L)
    tokens = torch.randint(1, VOCAB, (2, L, T), generator=g) * mask[..., None]
    tokens[..., 3:] = 0
    return dict(
        tokens=tokens,
        token_mask=tokens != 0,
        mask=mask,
        positions=torch.where(mask, lengths - 1 - i, 0),
        gap_buckets=torch.randint(0, 32, (2, L), generator=g) * mask,
        item_ids=torch.randint(1, ITEMS + 1, (2, L), generator=g) * mask,
    )


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_padding_is_masked_and_forward_matches_the_encode_path(arch: str) -> None:
    model = _model(arch)
    b = _users(1)
    with torch.no_grad():
        want = model(**b)
        # Garbage in padded behaviors (their ids, tokens) and in padded token slots is hidden.
        junk = dict(b)
        pad = ~b["mask"]
        junk["item_ids"] = torch.where(pad, torch.randint(1, ITEMS + 1, (2, L)), b["item_ids"])
        noise = torch.randint(1, VOCAB, b["tokens"].shape)
        junk["tokens"] = torch.where(pad[..., None] | ~b["token_mask"], noise, b["tokens"])
        junk["token_mask"] = b["token_mask"] & b["mask"][..., None]
        assert torch.allclose(model(**junk), want, atol=1e-5)
        vecs = model.encode_items(
            b["tokens"].flatten(0, 1), b["token_mask"].flatten(0, 1), b["item_ids"].flatten()
        ).reshape(2, L, D)
        users = model.encode_users(vecs, b["mask"], b["positions"], b["gap_buckets"])
    assert torch.allclose(users, want, atol=1e-6)
    # The ids do reach the user vector: another id for a real behavior changes it.
    other = dict(b, item_ids=torch.where(b["mask"], 1 + b["item_ids"] % ITEMS, 0))
    with torch.no_grad():
        assert not torch.allclose(model(**other), want, atol=1e-4)


def test_item_ids_are_required_and_id_index_is_checked() -> None:
    model = _model()
    tokens, mask = _rows(2)
    with pytest.raises(ValueError, match="needs item_ids"):
        model.encode_items(tokens, mask)
    enc: HybridBehaviorEncoder = model.behavior_encoder
    good = enc.id_index.clone()
    with pytest.raises(ValueError, match="shape"):
        enc.set_id_index(good[:-1])
    bad = good.clone()
    bad[3] = PAD_ROW
    with pytest.raises(ValueError, match="padding row"):
        enc.set_id_index(bad)
    bad = good.clone()
    bad[3] = 6
    with pytest.raises(ValueError, match="past the 6 rows"):
        enc.set_id_index(bad)
    # The mapping is a buffer: it is saved with the weights, and not trained.
    assert "behavior_encoder.id_index" in model.state_dict()
    assert all(p is not enc.id_index for p in model.parameters())
