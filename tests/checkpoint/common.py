"""Shared by the checkpoint tests: a tiny model, a save with an optimizer, directory hashes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ptum import checkpoint
from ptum.models.user_model import ModelConfig, UserModel

TINY = ModelConfig(
    behavior_encoder="selfattn",
    user_encoder="hsa",
    vocab_size=50,
    max_tokens=4,
    max_behaviors=6,
    word_dim=8,
    dim=8,
    heads=2,
    head_dim=4,
    attn_hidden=8,
    dropout=0.0,
    layers=1,
)


def tiny_model(seed: int) -> UserModel:
    torch.manual_seed(seed)
    return UserModel(config=TINY)


def stepped_optimizer(model: UserModel) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sum(p.sum() for p in model.parameters()).backward()
    opt.step()
    return opt


def save_tiny(directory: Path, seed: int, step: int) -> UserModel:
    """Save a seeded tiny model and its AdamW state as the checkpoint of `step`."""
    model = tiny_model(seed)
    meta = {"model_config": TINY.to_dict(), "global_step": step, "epoch": step}
    checkpoint.save(directory, model, meta, stepped_optimizer(model))
    return model


def hashes(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def flip(path: Path, offset: int = -3) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
