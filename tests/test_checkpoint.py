"""Checkpoint directories: one atomic unit per save, every file verified on read, fallback to the
last complete checkpoint, byte-equal directories for equal saves."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest
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


def _model(seed: int) -> UserModel:
    torch.manual_seed(seed)
    return UserModel(config=TINY)


def _optimizer(model: UserModel) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sum(p.sum() for p in model.parameters()).backward()
    opt.step()
    return opt


def _save(directory: Path, seed: int, step: int) -> UserModel:
    model = _model(seed)
    meta = {"model_config": TINY.to_dict(), "global_step": step, "epoch": step}
    checkpoint.save(directory, model, meta, _optimizer(model))
    return model


def _hashes(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _flip(path: Path, offset: int = -3) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_save_is_one_directory_switched_by_latest(tmp_path):
    _save(tmp_path, seed=0, step=5)
    second = _save(tmp_path, seed=1, step=10)
    # Only the live checkpoint stays; LATEST names it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "ckpt-00000010"]
    assert (tmp_path / "LATEST").read_text() == "ckpt-00000010\n"
    assert sorted(p.name for p in (tmp_path / "ckpt-00000010").iterdir()) == [
        "meta.json",
        "model.safetensors",
        "optimizer.safetensors",
    ]
    loaded = checkpoint.load(tmp_path, with_optimizer=True)
    assert _same(loaded.model, second) and loaded.optimizer_tensors
    assert loaded.path == tmp_path / "ckpt-00000010" == checkpoint.live(tmp_path)


def test_equal_saves_give_byte_equal_directories(tmp_path):
    _save(tmp_path / "a", seed=3, step=7)
    _save(tmp_path / "b", seed=3, step=7)
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")


def test_saving_the_live_step_again(tmp_path):
    _save(tmp_path, seed=0, step=4)
    model = _save(tmp_path, seed=1, step=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "ckpt-00000004"]
    assert _same(checkpoint.load(tmp_path).model, model)


@pytest.mark.parametrize("fail_on", ["model.safetensors", "optimizer.safetensors", "meta.json"])
def test_a_failed_save_leaves_the_previous_checkpoint_live(tmp_path, monkeypatch, fail_on):
    first = _save(tmp_path, seed=0, step=5)
    real = checkpoint._write_durable

    def disk_full(path: Path, data: bytes) -> None:
        if path.name == fail_on:
            path.write_bytes(data[: len(data) // 2])
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(checkpoint, "_write_durable", disk_full)
    with pytest.raises(OSError, match="No space left"):
        _save(tmp_path, seed=1, step=10)
    monkeypatch.undo()
    # The staging directory is gone; nothing warns: the live checkpoint never changed.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "ckpt-00000005"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _same(checkpoint.load(tmp_path).model, first)


def test_killed_save_states_fall_back_to_the_last_complete_checkpoint(tmp_path):
    first = _save(tmp_path, seed=0, step=5)
    # A kill during the files of a save leaves a staging directory: ignored.
    staging = tmp_path / ".staging-ckpt-00000010-999"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"partial")
    assert _same(checkpoint.load(tmp_path).model, first)
    # A kill after the rename, before LATEST moved: LATEST still names the previous one.
    (tmp_path / "ckpt-00000010").mkdir()
    (tmp_path / "ckpt-00000010" / "model.safetensors").write_bytes(b"partial")
    assert _same(checkpoint.load(tmp_path).model, first)
    # LATEST naming a missing or torn checkpoint: the newest complete one, with a warning.
    (tmp_path / "LATEST").write_text("ckpt-00000011\n")
    with pytest.warns(
        checkpoint.CheckpointFallbackWarning, match="ckpt-00000011, which is missing"
    ):
        assert _same(checkpoint.load(tmp_path).model, first)
    (tmp_path / "LATEST").write_text("ckpt-00000010\n")
    with pytest.warns(checkpoint.CheckpointFallbackWarning, match="ckpt-00000005"):
        assert checkpoint.read_meta(tmp_path)["global_step"] == 5
    # The next save cleans everything up.
    second = _save(tmp_path, seed=1, step=12)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "ckpt-00000012"]
    assert _same(checkpoint.load(tmp_path).model, second)


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "meta.json"])
def test_a_flipped_byte_in_any_file_is_a_one_line_error(tmp_path, name):
    _save(tmp_path, seed=0, step=5)
    path = tmp_path / "ckpt-00000005" / name
    # meta.json: flip a digit of the step count; elsewhere a byte of the tensor data.
    _flip(path, offset=path.read_text().index('"epoch": 5') + 9 if name == "meta.json" else -3)
    with pytest.raises(checkpoint.CorruptCheckpoint) as e:
        checkpoint.load(tmp_path, with_optimizer=True)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "no earlier complete checkpoint" in msg
    assert isinstance(e.value, ValueError)  # the CLI prints ValueErrors as one line


def test_an_edited_meta_is_refused_even_as_valid_json(tmp_path):
    _save(tmp_path, seed=0, step=5)
    path = tmp_path / "ckpt-00000005" / "meta.json"
    meta = json.loads(path.read_text())
    meta["epoch"] = 3
    path.write_text(json.dumps(meta))
    with pytest.raises(checkpoint.CorruptCheckpoint, match="meta.json: content does not match"):
        checkpoint.read_meta(tmp_path)


def test_a_corrupt_live_checkpoint_falls_back_to_an_earlier_complete_one(tmp_path):
    first = _save(tmp_path, seed=0, step=5)
    keep = tmp_path / "keep"
    (tmp_path / "ckpt-00000005").rename(keep)
    _save(tmp_path, seed=1, step=10)
    keep.rename(tmp_path / "ckpt-00000005")  # as if the crash came before the old one's removal
    _flip(tmp_path / "ckpt-00000010" / "optimizer.safetensors")
    with pytest.warns(checkpoint.CheckpointFallbackWarning, match="optimizer.safetensors"):
        assert _same(checkpoint.load(tmp_path, with_optimizer=True).model, first)


def test_the_flat_layout_is_read_and_replaced(tmp_path):
    model = _model(0)
    data = checkpoint._tensor_bytes(model.state_dict())
    (tmp_path / "model.safetensors").write_bytes(data)
    meta = {"model_config": TINY.to_dict(), "model_sha256": hashlib.sha256(data).hexdigest()}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "demo_age.json").write_text("{}")  # not a checkpoint file: kept
    assert _same(checkpoint.load(tmp_path).model, model)
    second = _save(tmp_path, seed=1, step=3)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["LATEST", "ckpt-00000003", "demo_age.json"]
    assert _same(checkpoint.load(tmp_path).model, second)


def test_no_checkpoint_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.read_meta(tmp_path)
    assert not checkpoint.exists(tmp_path)


def test_re_saving_a_loaded_meta_without_an_optimizer(tmp_path):
    _save(tmp_path / "a", seed=0, step=5)
    loaded = checkpoint.load(tmp_path / "a")
    checkpoint.save(tmp_path / "b", loaded.model, loaded.meta)  # meta names an optimizer file
    meta = checkpoint.read_meta(tmp_path / "b")
    assert "optimizer_sha256" not in meta and _same(
        checkpoint.load(tmp_path / "b").model, loaded.model
    )
