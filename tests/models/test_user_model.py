"""Tests for ptum.models.user_model: config round trip, MBP masking, serving path."""

import json

import pytest
import torch

from ptum.models.user_model import ARCHITECTURES, ModelConfig, UserModel

VOCAB, T, L, D = 40, 5, 6, 32
TINY = dict(
    vocab_size=VOCAB,
    max_tokens=T,
    max_behaviors=L,
    word_dim=16,
    dim=D,
    heads=2,
    head_dim=8,
    attn_hidden=8,
    dropout=0.1,
    layers=1,
)
VARIANTS = {name: ModelConfig.for_architecture(name, **TINY) for name in ARCHITECTURES}
VARIANTS["id+hsa"] = ModelConfig(
    behavior_encoder="id", user_encoder="hsa", **{**TINY, "max_tokens": 1}, num_items=VOCAB
)


def _batch(lengths: list[int], width: int = T, seq: int = L) -> dict[str, torch.Tensor]:
    """Users of right-padded behaviors (B, seq); each behavior a right-padded token row (width)."""
    B = len(lengths)
    n = torch.tensor(lengths)[:, None]
    i = torch.arange(seq)[None, :]
    mask = i < n  # (B, seq)
    tok_len = torch.randint(1, width + 1, (B, seq)) * mask  # pad behaviors are the empty item 0
    token_mask = torch.arange(width) < tok_len[..., None]  # (B, seq, width)
    return dict(
        tokens=torch.randint(1, VOCAB, (B, seq, width)) * token_mask,
        token_mask=token_mask,
        mask=mask,
        positions=torch.where(mask, n - 1 - i, 0),
        gap_buckets=torch.randint(0, 32, (B, seq)) * mask,
    )


@pytest.fixture(params=sorted(VARIANTS))
def model(request) -> UserModel:
    torch.manual_seed(0)
    return UserModel(config=VARIANTS[request.param]).eval()


def _width(model: UserModel) -> int:
    return 1 if model.config.behavior_encoder == "id" else T


def test_forward_matches_encode_path(model: UserModel) -> None:
    b = _batch([6, 3, 0], _width(model))
    out = model(**b)
    assert out.shape == (3, D) and torch.isfinite(out).all()
    vecs = model.encode_items(b["tokens"].flatten(0, 1), b["token_mask"].flatten(0, 1))
    users = model.encode_users(vecs.view(3, L, D), b["mask"], b["positions"], b["gap_buckets"])
    assert torch.allclose(out, users, atol=1e-6)


def test_padded_behaviors_do_not_matter(model: UserModel) -> None:
    b = _batch([6, 2], _width(model))
    pads = ~b["mask"]
    other = dict(b)
    other["tokens"] = torch.where(
        pads[..., None], torch.randint(1, VOCAB, b["tokens"].shape), b["tokens"]
    )
    other["token_mask"] = b["token_mask"] | pads[..., None]
    assert torch.allclose(model(**other), model(**b), atol=1e-5)


def test_mbp_mask_hides_the_masked_behavior(model: UserModel) -> None:
    b = _batch([6, 4], _width(model))
    vecs = torch.randn(2, L, D)
    mbp = torch.zeros(2, L, dtype=torch.bool)
    mbp[0, 2] = mbp[1, 3] = True
    args = (b["mask"], b["positions"], b["gap_buckets"])
    out = model.encode_users(vecs, *args, mbp_mask=mbp)
    changed = vecs.clone()
    changed[mbp] = torch.randn(2, D) * 5  # random, not a constant shift (LayerNorm removes those)
    assert torch.allclose(model.encode_users(changed, *args, mbp_mask=mbp), out, atol=1e-5)
    assert not torch.allclose(model.encode_users(changed, *args), model.encode_users(vecs, *args))


def test_mask_vector_is_trained_by_mbp() -> None:
    model = UserModel(config=VARIANTS["hsa"]).train()
    b = _batch([6, 4])
    vecs = torch.randn(2, L, D)
    mbp = torch.zeros(2, L, dtype=torch.bool)
    mbp[:, 1] = True
    out = model.encode_users(vecs, b["mask"], b["positions"], b["gap_buckets"], mbp_mask=mbp)
    out.pow(2).sum().backward()
    assert model.mask_vector.grad is not None and model.mask_vector.grad.abs().sum() > 0


def test_config_round_trips_through_json() -> None:
    cfg = VARIANTS["bert4rec"]
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_size": 3}, "unknown ModelConfig keys"),
        ({"user_encoder": "lstm"}, "unknown user_encoder"),
        ({"behavior_encoder": "gru"}, "unknown behavior_encoder"),
        ({"dim": "32"}, "ModelConfig.dim must be int"),
        ({"dim": True}, "ModelConfig.dim must be int"),
        ({"dropout": 1.5}, "dropout"),
        ({"behavior_encoder": "id", "num_items": 0}, "num_items"),
    ],
)
def test_config_rejects_bad_values(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict({**VARIANTS["hsa"].to_dict(), **change})


def test_config_rejects_missing_keys() -> None:
    data = VARIANTS["hsa"].to_dict()
    del data["vocab_size"]
    with pytest.raises(ValueError, match="missing ModelConfig keys"):
        ModelConfig.from_dict(data)


def test_every_architecture_trains_one_step() -> None:
    for cfg in VARIANTS.values():
        torch.manual_seed(0)
        model = UserModel(config=cfg).train()
        b = _batch([6, 1, 0], 1 if cfg.behavior_encoder == "id" else T)
        loss = model(**b).pow(2).mean()
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
